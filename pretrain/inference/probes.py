"""RULER-style long-context probes, built synthetically with the run's tokenizer over any text.

- ``niah_mq`` (multi-query needle in a haystack): ``NEEDLES`` sentences "The special magic number
  for KEY is: VALUE." at random depths of a haystack of filler text; then ``QUERIES`` of the keys
  are asked, one prompt each, ending "The special magic number for KEY is:". A query scores 1
  when greedy generation contains the value.
- ``vt`` (variable tracking): a chain "VAR A = 12345. VAR B = A. VAR C = B. ..." scattered through
  the haystack, then "Find all variables that are assigned the value 12345:". The score is the
  fraction of the chain's names found in the generated answer.
- ``ppl_by_position``: the mean next-token loss of haystack windows of each length, in
  ``BUCKETS`` position buckets.

The harness takes a ``generate(prompt_ids, max_new_tokens) -> new_ids`` callable, so anything
that generates can be probed (``tests/test_probes.py`` probes a copying oracle and a random one).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.inference.windows import forward_window

NEEDLES, QUERIES, CHAIN, BUCKETS = 4, 2, 4, 8
KEYS = (
    "apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano", "lemon", "forest",
    "silver", "candle", "rocket", "garden", "winter", "violet", "hammer", "island", "falcon",
    "meadow",
)  # fmt: skip
Generate = Callable[[list[int], int], list[int]]


class Haystack:
    """Filler token ids cut from a long id stream (any corpus text), at a rotating offset."""

    def __init__(self, ids: np.ndarray):
        if ids.size < 64:
            raise ValueError("the haystack text is too short: give more text (--text)")
        self.ids, self.offset = ids, 0

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            chunk = self.ids[self.offset : self.offset + count - len(out)]
            out += chunk.tolist()
            self.offset = (self.offset + len(chunk)) % self.ids.size
        return out


def _insert(filler: list[int], pieces: list[list[int]], rng: random.Random) -> list[int]:
    """``pieces`` inserted in order at random depths of ``filler``."""
    cuts = sorted(rng.randrange(len(filler) + 1) for _ in pieces)
    out, last = [], 0
    for cut, piece in zip(cuts, pieces, strict=True):
        out += filler[last:cut] + piece
        last = cut
    return out + filler[last:]


def niah_samples(encode, haystack: Haystack, length: int, count: int, seed: int):
    """``(prompt_ids, answer_text)`` pairs: prompts of about ``length`` tokens."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        keys = rng.sample(KEYS, NEEDLES)
        values = [str(rng.randrange(100000, 1000000)) for _ in keys]
        needles = [
            encode(f" The special magic number for {k} is: {v}.")
            for k, v in zip(keys, values, strict=True)
        ]
        asked = rng.sample(range(NEEDLES), QUERIES)
        queries = [encode(f" The special magic number for {keys[i]} is:") for i in asked]
        budget = length - sum(map(len, needles)) - max(map(len, queries))
        context = _insert(haystack.take(max(1, budget)), needles, rng)
        samples += [(context + q, values[i]) for q, i in zip(queries, asked, strict=True)]
    return samples


def vt_samples(encode, haystack: Haystack, length: int, count: int, seed: int):
    """``(prompt_ids, [names])`` pairs for variable tracking."""
    rng = random.Random(seed + 1)
    samples = []
    for _ in range(count):
        names = [
            "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(CHAIN)
        ]
        value = str(rng.randrange(10000, 100000))
        chain = [encode(f" VAR {names[0]} = {value}.")]
        chain += [encode(f" VAR {names[i]} = {names[i - 1]}.") for i in range(1, CHAIN)]
        query = encode(f" Find all variables that are assigned the value {value}: VAR")
        budget = length - sum(map(len, chain)) - len(query)
        samples.append((_insert(haystack.take(max(1, budget)), chain, rng) + query, names))
    return samples


def score_niah(generate: Generate, decode, samples, max_new: int = 12) -> float:
    hits = [answer in decode(generate(prompt, max_new)) for prompt, answer in samples]
    return sum(hits) / len(hits)


def score_vt(generate: Generate, decode, samples, max_new: int = 40) -> float:
    scores = []
    for prompt, names in samples:
        text = decode(generate(prompt, max_new))
        scores.append(sum(name in text for name in names) / len(names))
    return sum(scores) / len(scores)


@torch.no_grad()
def loss_by_position(model, hasher, haystack: Haystack, length: int, count: int) -> list[float]:
    """Mean loss in ``BUCKETS`` equal position buckets over ``count`` windows of ``length``."""
    sums, counts = torch.zeros(BUCKETS, dtype=torch.float64), torch.zeros(BUCKETS)
    bucket = torch.arange(length) * BUCKETS // length
    for _ in range(count):
        window = np.asarray(haystack.take(length + 1), dtype=np.int64)
        logits = forward_window(model, hasher, window).logits[0].float()
        loss = F.cross_entropy(logits, torch.from_numpy(window[1:]), reduction="none")
        sums.index_add_(0, bucket, loss.double())
        counts.index_add_(0, bucket, torch.ones(length))
    return (sums / counts).tolist()


def run_probes(
    probes: list[str],
    lengths: list[int],
    *,
    generate: Generate,
    encode,
    decode,
    haystack: Haystack,
    samples: int,
    seed: int = 0,
    model=None,
    hasher=None,
    progress=print,
) -> dict:
    """``{probe: {length: score}}`` (``ppl_by_position``: ``{length: [loss per bucket]}``)."""
    known = ("niah_mq", "vt", "ppl_by_position")
    unknown = [p for p in probes if p not in known]
    if unknown:
        raise ValueError(f"--probe {','.join(unknown)}: choose from {', '.join(known)}")
    results: dict = {p: {} for p in probes}
    for length in lengths:
        for probe in probes:
            if probe == "niah_mq":
                score = score_niah(
                    generate, decode, niah_samples(encode, haystack, length, samples, seed)
                )
            elif probe == "vt":
                score = score_vt(
                    generate, decode, vt_samples(encode, haystack, length, samples, seed)
                )
            else:
                score = loss_by_position(model, hasher, haystack, length, samples)
            results[probe][str(length)] = score
            shown = (
                f"{score:.3f}"
                if isinstance(score, float)
                else "[" + ", ".join(f"{v:.2f}" for v in score) + "]"
            )
            progress(f"{probe} @ {length}: {shown}")
    return results


def plot_probes(results: dict, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[analysis]'): no plot written")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for probe in ("niah_mq", "vt"):
        if probe in results:
            xs = sorted(results[probe], key=int)
            axes[0].plot(
                [int(x) for x in xs], [results[probe][x] for x in xs], marker="o", label=probe
            )
    axes[0].set_xscale("log", base=2)
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].set_xlabel("context length (tokens)")
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    for length, losses in sorted(
        results.get("ppl_by_position", {}).items(), key=lambda kv: int(kv[0])
    ):
        centers = [(i + 0.5) * int(length) / len(losses) for i in range(len(losses))]
        axes[1].plot(centers, losses, marker=".", label=f"{length}")
    axes[1].set_xlabel("position")
    axes[1].set_ylabel("loss")
    if "ppl_by_position" in results:
        axes[1].legend(title="length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
