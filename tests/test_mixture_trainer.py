"""Mixtures through the trainer (data/mixture.py with pretrain.train): per-source validation
losses and skipped records are the trainer's own numbers, a two-worker mixture resumes
bit-identically after SIGKILL, and ``launch.inspect_data`` dumps the rows training sees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests import test_mixture
from tests.test_mixture import EOS, VOCAB, _docs, _megatron, _specs, _stream

sources = test_mixture.sources  # the two sources of test_mixture.py, a fixture

# ----- the trainer ------------------------------------------------------------------------------


def _mixture_job(corpus, root):
    """A megatron source (the corpus's own shards, re-written by megatron-core) and a text source
    (stdlib files as JSON lines), with held-out text."""
    import sysconfig
    from pathlib import Path

    from data.shards import load_index, read_shard

    docs = []
    for shard in load_index(corpus, "train")["shards"][:4]:
        docs += [d.tokens for d in read_shard(str(corpus / shard["name"]), VOCAB)]
    prefix = _megatron(root / "code", docs)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[120:150]
    for name, part in (("web", files[:24]), ("web_val", files[24:])):
        lines = [json.dumps({"text": f.read_text(errors="replace")}) for f in part]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    sources = [
        f'{{name = "code", format = "megatron", path = "{prefix}", weight = 0.3}}',
        f'{{name = "web", format = "text", path = "{root / "web.jsonl"}", weight = 0.7, '
        f'val_path = "{root / "web_val.jsonl"}"}}',
    ]
    return ["--data.mixture=[" + ", ".join(sources) + "]", "--metrics.eval_freq=8"]


def test_per_source_val_loss_and_skipped_records_are_the_trainers_own_numbers(corpus, tmp_path):
    """``val_loss/a`` is a plain forward over the source's held-out documents (ids of a range
    the training documents never use), and ``data/skipped/web`` counts the text source's
    malformed records (three, planted)."""
    from pretrain.config import load_config
    from pretrain.train import Trainer
    from tests.test_trainer import _overrides, _records

    seq_len, rng = 64, np.random.default_rng(7)
    train = _docs(3, 200, 3, 500)
    np.save(tmp_path / "a.npy", np.concatenate(train).astype(np.int32))
    # held-out documents of exactly T + 1 tokens, EOS last: validation row j is document j
    val = [np.append(rng.integers(500, VOCAB, seq_len), EOS) for _ in range(6)]
    np.save(tmp_path / "a_val.npy", np.concatenate(val).astype(np.int32))
    good = [json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 4}) for i in range(40)]
    bad = ["{not json", '{"body": "no text field"}', "[1, 2"]
    (tmp_path / "web.jsonl").write_text("\n".join(good[:10] + bad + good[10:]) + "\n")
    sources = [
        f'{{name = "a", format = "tokens", path = "{tmp_path / "a.npy"}", weight = 0.7, '
        f'val_path = "{tmp_path / "a_val.npy"}"}}',
        f'{{name = "web", format = "text", path = "{tmp_path / "web.jsonl"}", weight = 0.3}}',
    ]
    extra = [
        "--data.mixture=[" + ", ".join(sources) + "]",
        f"--data.tokenizer={corpus / 'tokenizer.model'}",
        f"--data.index_dir={tmp_path / 'index'}",
        "--checkpoint.enable=false",
    ]
    dump = tmp_path / "run"
    trainer = Trainer(
        load_config(
            "pretrain/configs/debug.toml", _overrides(corpus, dump, steps=4, workers=0) + extra
        )
    )
    trainer.fit()
    last = _records(dump)[4]
    assert last["data/skipped/web"] == 3 and "data/skipped/a" in last
    logged = json.loads((dump / "metrics.jsonl").read_text().splitlines()[-1])
    model, hasher = trainer.model.eval(), trainer.hasher
    losses = []
    for first in (0, 2):  # metrics.eval_batches=2 batches of training.batch_size=2 rows
        rows = torch.from_numpy(np.stack(val[first : first + 2]).astype(np.int64))
        x, y = rows[:, :-1], rows[:, 1:]
        engram = {k: torch.from_numpy(v) for k, v in hasher.hash(x.numpy()).items()}
        with torch.no_grad():
            logits = model(x, engram=engram).logits
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
    want = torch.stack(losses).mean().item()
    assert logged["val_loss/a"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert "val_loss/web" not in logged  # no held-out documents: no number


def test_sigkill_resume_of_a_mixture_with_two_workers_is_bit_identical(corpus, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from pretrain.checkpoint import _state
    from pretrain.config import load_config
    from pretrain.train import Trainer
    from tests.test_trainer import REPO, _assert_equal_trees, _cmd, _overrides, _records, _run

    extra = _mixture_job(corpus, tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = _run(_cmd(corpus, straight, steps=16, workers=2) + extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val_loss/web:" in result.stdout  # the source's held-out loss beside val_loss
    proc = subprocess.Popen(
        _cmd(corpus, killed, steps=16, workers=2) + extra,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if (killed / "metrics.jsonl").is_file() and max(_records(killed), default=0) >= 9:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(_records(killed)) < 16, "the run finished before it could be killed"
    result = _run(_cmd(corpus, killed, steps=16, workers=2) + extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    want, got = _records(straight), _records(killed)
    assert sorted(got) == list(range(1, 17))
    for step in want:
        assert got[step]["loss"] == want[step]["loss"], step
    last = want[16]
    assert last["data/tokens/code"] + last["data/tokens/web"] == 16 * 2 * 64  # steps x B x T
    assert abs(last["data/tokens/code"] / (16 * 2 * 64) - 0.3) < 0.05
    finished = [
        Trainer(load_config("pretrain/configs/debug.toml", _overrides(corpus, f, 16, 2) + extra))
        for f in (straight, killed)
    ]
    _assert_equal_trees(*(_state(t.model, t.optimizers, blocked=False) for t in finished))


def test_inspect_shows_shares_and_dumps_the_rows_training_sees(corpus, tmp_path, sources, capsys):
    from launch.inspect_data import main

    _, a, b = sources
    config = tmp_path / "job.toml"
    config.write_text(
        f"""[data]
tokenizer = "{corpus / "tokenizer.model"}"
seq_len = 32
num_workers = 0

[training]
batch_size = 4

[[data.mixture]]
name = "a"
format = "megatron"
path = "{a}"
weight = 0.25

[[data.mixture]]
name = "b"
format = "tokens"
path = "{b}"
weight = 0.75
"""
    )
    dump = tmp_path / "rows.npz"
    assert main(["--config", str(config), "--batches", "8", "--dump", str(dump)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["tokens"] == 8 * 4 * 32
    assert last["share"] == {"a": 0.25, "b": 0.75}
    saved = np.load(dump)
    assert saved["tokens"].shape == saved["sources"].shape == (8, 4, 33)
    stream = _stream(_specs(a, b), batch=4).batches()
    for n in range(8):
        batch, state = next(stream)
        assert np.array_equal(saved["tokens"][n, :, :-1], batch.tokens)
        assert (saved["sources"][n] == np.asarray(state["row_sources"])[:, None]).all()
