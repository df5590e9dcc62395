"""Row-cache hit rates of Engram lookups on real text, per n-gram order, for cache sizes from 0.1%
to 50% of a table's rows (the numbers the paper does not publish), and the unique-rows fraction
of a batch.

The demo model's hashing (its tokenizer, corpus and hash configuration) with tables of about
``--rows_per_head`` rows per head (default 2M: 16M rows per layer, so that even a 0.1% cache
holds a whole batch's rows; the demo's own 30,011 are too small for that). Batches of the training
stream are hashed as the loader hashes them, and every cache size replays the same batches
through the real ``models.tables.tier.RowCache`` (least recently used by batch; a batch's rows are
resident together, then released by the optimizer step), one cache per Engram layer, counting
per batch whether each distinct row it needs was already resident. The first ``--warmup``
batches fill the caches and are not counted.

Prints a table (cache share, slots, hit rate overall and per order) and the unique-rows fractions;
``--plot FILE.png`` also draws the hit rates (needs matplotlib: ``pip install -e .[analysis]``).

Run: .venv/bin/python -m benchmarks.engram_hit_rates [--batches 300 --plot docs/hit_rates.png]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import print_table
from data.loader import StatefulLoader
from data.tokenizer import load_tokenizer
from models.tables.tier import RowCache, RowStore
from pretrain.builders import build_hasher, build_model_args
from pretrain.config import ModelConfig

SHARES = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def hashed_batches(data: str, rows_per_head: int, batches: int, batch_size: int, seq_len: int):
    """``(per-layer flat row ids [B, T, K], rows per layer, heads per order)`` of the first
    ``batches`` training batches."""
    tokenizer = load_tokenizer(f"{data}/tokenizer.model")
    probe = build_model_args(ModelConfig(flavor="demo"), tokenizer, seq_len)
    orders = len(probe.engram.hash.engram_vocab_size)
    overrides = {"engram.hash.engram_vocab_size": [rows_per_head] * orders}
    args = build_model_args(ModelConfig(flavor="demo", overrides=overrides), tokenizer, seq_len)
    hasher = build_hasher(args, tokenizer)
    spec = args.engram.hash
    loader = StatefulLoader(
        dict(
            folder=data,
            split="train",
            batch_size=batch_size,
            seq_len=seq_len,
            vocab_size=tokenizer.vocab_size,
            hasher=hasher,
        ),
        num_workers=1,
    )
    stream = []
    for _ in range(batches):
        batch = next(loader)
        stream.append(
            {
                layer: np.asarray(inputs.hash_ids) + spec.head_offsets(layer)
                for layer, inputs in batch.engram.items()
            }
        )
    loader.close()
    rows = {layer: spec.num_rows(layer) for layer in spec.layer_ids}
    return stream, rows, spec.n_head_per_ngram


def replay(stream, rows: dict, heads_per_order: int, share: float, warmup: int):
    """``(hits [orders], distinct rows needed [orders], slots)`` over the stream after
    ``warmup`` batches, one cache of ``share`` of the rows per layer (never fewer slots than a
    batch's distinct rows: the trainer's floor)."""
    widest = max(len(np.unique(flat)) for batch in stream for flat in batch.values())
    caches = {
        layer: RowCache(
            RowStore(num_rows, {"weight": 1}, "host"), max(widest, int(share * num_rows)), "cpu"
        )
        for layer, num_rows in rows.items()
    }
    orders = next(iter(stream[0].values())).shape[-1] // heads_per_order
    hits, wanted = np.zeros(orders), np.zeros(orders)
    for i, batch in enumerate(stream):
        for layer, flat in batch.items():
            cache = caches[layer]
            if i >= warmup:
                for order in range(orders):
                    part = flat[..., order * heads_per_order : (order + 1) * heads_per_order]
                    needed = np.unique(part)
                    hits[order] += (cache.row_slot[needed] >= 0).sum()
                    wanted[order] += len(needed)
            cache.acquire(np.unique(flat), train=True)
            cache.step_done()
    return hits, wanted, min(c.num_slots for c in caches.values())


def unique_fractions(stream, heads_per_order: int) -> tuple[float, list[float]]:
    """Mean distinct rows over lookups of a batch's layer: overall, and per order."""
    overall, per_order = [], []
    for batch in stream:
        for flat in batch.values():
            overall.append(len(np.unique(flat)) / flat.size)
            orders = flat.shape[-1] // heads_per_order
            per_order.append(
                [len(np.unique(part)) / part.size for part in np.split(flat, orders, axis=-1)]
            )
    return float(np.mean(overall)), list(np.mean(per_order, axis=0))


def plot(path: str, shares, rates, orders: int, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(
            "--plot needs matplotlib: pip install -e .[analysis] (or drop --plot)"
        ) from err
    fig, ax = plt.subplots(figsize=(6, 4))
    for order in range(orders):
        ax.plot(
            [100 * s for s in shares], [r[order] for r in rates], "o-", label=f"{order + 2}-grams"
        )
    ax.plot([100 * s for s in shares], [r[-1] for r in rates], "k--", label="all")
    ax.set_xscale("log")
    ax.set_xlabel("cache size (% of a table's rows)")
    ax.set_ylabel("hit rate (distinct rows of a batch)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data_cache/demo")
    parser.add_argument("--rows_per_head", type=int, default=2_000_000)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--plot", default=None, help="write the hit-rate plot to this PNG")
    ns = parser.parse_args()
    if ns.warmup >= ns.batches:
        raise SystemExit(f"--warmup={ns.warmup} must be below --batches={ns.batches}")
    started = time.perf_counter()
    stream, rows, heads = hashed_batches(
        ns.data, ns.rows_per_head, ns.batches, ns.batch_size, ns.seq_len
    )
    print(f"hashed {ns.batches} batches in {time.perf_counter() - started:.0f} s")
    orders = next(iter(stream[0].values())).shape[-1] // heads
    table, rates = [], []
    for share in SHARES:
        hits, wanted, slots = replay(stream, rows, heads, share, ns.warmup)
        rate = [*(hits / wanted), hits.sum() / wanted.sum()]
        rates.append(rate)
        table.append([f"{share:.1%}", slots, *rate])
        print(f"  cache {share:.1%}: done", flush=True)
    layer_rows = next(iter(rows.values()))
    print(
        f"Engram layers {list(rows)}, {layer_rows:,} rows each "
        f"(about {ns.rows_per_head:,} per head), "
        f"{ns.batches - ns.warmup} batches of {ns.batch_size} x {ns.seq_len} tokens counted "
        f"after {ns.warmup} warm-up batches"
    )
    print_table(["cache", "slots", *(f"hit {o + 2}-gram" for o in range(orders)), "hit all"], table)
    overall, per_order = unique_fractions(stream, heads)
    print_table(
        ["unique rows / lookups", *(f"{o + 2}-gram" for o in range(orders)), "all"],
        [["per batch and layer", *per_order, overall]],
    )
    if ns.plot:
        title = (
            f"demo hashing, {layer_rows / 1e6:.0f}M rows per layer, batches of "
            f"{ns.batch_size}x{ns.seq_len} tokens"
        )
        plot(ns.plot, SHARES, rates, orders, title)
        print(f"plot: {ns.plot}")


if __name__ == "__main__":
    main()
