"""The long-context probe harness (pretrain/probes.py) tells a model that can copy from one that
cannot, and runs end to end from a checkpoint (launch.evaluate --probe)."""

from __future__ import annotations

import json
import random
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from pretrain.inference import probes


@pytest.fixture(scope="module")
def tokenizer(corpus):
    from data.tokenizer import load_tokenizer

    return load_tokenizer(corpus / "tokenizer.model")


@pytest.fixture(scope="module")
def haystack(tokenizer):
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    return probes.Haystack(np.asarray(tokenizer.encode(text), dtype=np.int64))


def copier(prompt: list[int], max_new: int) -> list[int]:
    """An induction oracle: find the longest earlier occurrence of the prompt's ending and copy
    what followed it."""
    for k in range(min(16, len(prompt) - 1), 0, -1):
        tail = prompt[-k:]
        for start in range(len(prompt) - k - 1, -1, -1):
            if prompt[start : start + k] == tail:
                return prompt[start + k : start + k + max_new]
    return []


def solver(decode):
    """A variable-tracking oracle that reads the prompt."""

    def generate(prompt: list[int], max_new: int) -> list[int]:
        text = decode(prompt)
        value = re.findall(r"assigned the value (\d+)", text)[-1]
        names = {n for n, v in re.findall(r"VAR (\w+) = (\w+)\.", text) if v == value}
        grew = True
        while grew:
            more = {n for n, v in re.findall(r"VAR (\w+) = (\w+)\.", text) if v in names}
            grew = not more <= names
            names |= more
        return [ord(c) for c in " ".join(sorted(names))]

    return generate


def random_model(prompt: list[int], max_new: int) -> list[int]:
    rng = random.Random(len(prompt))
    return [rng.randrange(3, 1000) for _ in range(max_new)]


def test_probe_niah_scores_a_copier_near_one_and_a_random_model_near_zero(tokenizer, haystack):
    samples = probes.niah_samples(tokenizer.encode, haystack, 256, 6, seed=0)
    assert len(samples) == 6 * probes.QUERIES
    assert all(240 <= len(p) <= 300 for p, _ in samples)
    assert probes.score_niah(copier, tokenizer.decode, samples) >= 0.9
    assert probes.score_niah(random_model, tokenizer.decode, samples) <= 0.1


def test_probe_vt_scores_a_solver_at_one_and_a_random_model_near_zero(tokenizer, haystack):
    samples = probes.vt_samples(tokenizer.encode, haystack, 256, 4, seed=0)
    chars = "".join  # the solver answers in characters

    def decode_chars(ids):
        return chars(chr(i) for i in ids)

    solve = solver(tokenizer.decode)
    assert probes.score_vt(solve, decode_chars, samples) == 1.0
    assert probes.score_vt(random_model, tokenizer.decode, samples) <= 0.1


def test_probe_cli_runs_from_a_checkpoint(corpus, tmp_path):
    from launch.evaluate import main
    from tests.test_convert import _train

    ckpt = _train(corpus, tmp_path / "run", "debug", steps=2)
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py")
    out = tmp_path / "probes"
    argv = ["--checkpoint", str(ckpt), "--probe", "niah_mq,vt,ppl_by_position"]
    argv += ["--lengths", "48,64", "--samples", "1", "--text", str(text), "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "probes.json").read_text())
    assert set(results["niah_mq"]) == {"48", "64"}
    assert all(0 <= v <= 1 for v in results["niah_mq"].values())
    losses = results["ppl_by_position"]["64"]
    assert len(losses) == probes.BUCKETS and all(np.isfinite(losses))
    too_long = ["--checkpoint", str(ckpt), "--probe", "niah_mq", "--lengths", "4096"]
    assert main([*too_long, "--text", str(text)]) == 2
    # a baseline beyond the trained positions (debug: 128) without YaRN
    beyond = ["--checkpoint", str(ckpt), "--probe", "ppl_by_position", "--lengths", "200"]
    assert main([*beyond, "--max_seq_len", "256", "--samples", "1", "--text", str(text)]) == 0
