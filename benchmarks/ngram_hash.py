"""N-gram hashing throughput: our NgramHasher against a straightforward implementation of the
reference formula (per-head arrays stacked at the end, as engram_demo_v1.py does), in the same
run, on one core.

Config: the reference defaults (2 Engram layers x 16 heads, N=3, DeepSeek-V3 tokenizer).
Run: .venv/bin/python -m benchmarks.ngram_hash
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from benchmarks.common import print_table, time_calls  # noqa: E402
from data.ngram_hash import CompressedTokenizer, EngramHashSpec, NgramHasher  # noqa: E402
from data.tokenizer import deepseek_v3_tokenizer_path, load_tokenizer  # noqa: E402


def reference_hash(hasher: NgramHasher, compressed: np.ndarray, layer: int) -> np.ndarray:
    """The reference formula written plainly: shifts, XOR mix, one modulo per head, stack."""
    x = compressed
    batch, seq = x.shape
    mult = hasher.multipliers[layer]
    shifts = [x] + [
        np.pad(x, ((0, 0), (k, 0)), constant_values=hasher.compressed_pad_id)[:, :seq]
        for k in range(1, hasher.max_ngram_size)
    ]
    heads = []
    for order in range(2, hasher.max_ngram_size + 1):
        mix = shifts[0] * mult[0]
        for k in range(1, order):
            mix = np.bitwise_xor(mix, shifts[k] * mult[k])
        for prime in hasher.primes[layer][order - 2]:
            heads.append((mix % prime).astype(np.int64, copy=False))
    return np.stack(heads, axis=2)


def main() -> None:
    compressed_tok = CompressedTokenizer.from_tokenizer(
        load_tokenizer(deepseek_v3_tokenizer_path())
    )
    spec = EngramHashSpec(
        engram_vocab_size=[129280 * 5] * 2,
        max_ngram_size=3,
        n_head_per_ngram=8,
        layer_ids=[1, 15],
        pad_id=2,
        seed=0,
    )
    hasher = NgramHasher(spec, compressed_tok)
    rng = np.random.default_rng(0)
    rows = []
    ratios = []
    for batch, seq in [(1, 4096), (8, 4096), (32, 512), (4, 16384)]:
        raw = rng.integers(0, 128_000, size=(batch, seq))
        tokens = batch * seq

        def ours_fn(raw=raw):
            return hasher.hash(raw)

        def ref_fn(raw=raw):
            compressed = compressed_tok.compress(raw)
            return [reference_hash(hasher, compressed, layer) for layer in hasher.layer_ids]

        ours = time_calls(ours_fn, repeats=7)
        ref = time_calls(ref_fn, repeats=7)
        for layer, ids in hasher.hash(raw).items():
            assert np.array_equal(ids, reference_hash(hasher, compressed_tok.compress(raw), layer))
        ratios.append(ref / ours)
        rows.append([f"{batch}x{seq}", tokens / ours / 1e6, tokens / ref / 1e6, ref / ours])
    print_table(["batch", "ours Mtok/s", "reference Mtok/s", "speedup"], rows)
    print(f"min_speedup: {min(ratios):.3f}")


if __name__ == "__main__":
    main()
