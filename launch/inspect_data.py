"""``python -m launch.inspect_data --config CFG [--batches N] [--decode K] [--dump FILE.npz]
[--world_size W] [--section.key=value ...]``

What the loader will feed a job, with no model built: the token share of each source over the
first N batches beside its weight, each source's document-length histogram, K decoded rows, and
optionally the rows themselves. ``--dump`` writes ``tokens`` (int64 ``[N, B, T+1]``: exactly the
rows rank 0 trains on, labels included) and ``sources`` (the same shape: each token's source, its
index in ``data.mixture``). The last line is JSON: ``{"tokens": ..., "share": {name: fraction}}``.

Legend: N batches, B batch per rank, T seq_len.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from data.loader import StatefulLoader
from data.mixture import check_sources
from parallel.dims import ParallelDims
from pretrain.builders import build_tokenizer, mixture_and_folder
from pretrain.config import DataConfig, load_config


def _rows(batch) -> np.ndarray:
    """``[B, T+1]``: the inputs and the last label of every row."""
    tokens, labels = batch.tokens.numpy(), batch.labels.numpy()
    return np.concatenate([tokens, labels[:, -1:]], axis=1)


def _histogram(lengths: np.ndarray) -> str:
    """Document lengths in powers of two: ``<=16: 12  <=32: 40 ...``."""
    if lengths.size == 0:
        return "(none)"
    edges = 2 ** np.arange(4, max(5, int(np.ceil(np.log2(max(lengths.max(), 2)))) + 1))
    counts = np.histogram(lengths, bins=np.concatenate([[0], edges]))[0]
    return "  ".join(f"<={e}: {c}" for e, c in zip(edges, counts, strict=True) if c)


def _segments(rows: np.ndarray, eos: int) -> np.ndarray:
    """Lengths of the documents (pieces, where a row cuts one) in ``rows``."""
    out = []
    for row in rows:
        ends = np.flatnonzero(row == eos) + 1
        bounds = np.concatenate([[0], ends, [row.size]])
        out += [int(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    return np.asarray(out)


def inspect(cfg, num_batches: int, world_size: int):
    """``(rows [N, B, T+1], sources [N, B], names, weights, eos)`` of rank 0's first batches."""
    d: DataConfig = cfg.data
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    folder, specs = mixture_and_folder(d, 0)
    tok = build_tokenizer(d, folder)
    common = dict(
        batch_size=cfg.training.batch_size,
        seq_len=d.seq_len,
        vocab_size=tok.vocab_size,
        seed=cfg.training.seed,
        dp_rank=0,
        dp_degree=dims.dp_degree,
        strict=d.strict,
    )
    if specs:
        workers = max(1, d.num_workers)
        check_sources(specs, tok, d.strict, index_dir=d.index_dir, workers=workers)
        where = dict(specs=specs, tokenizer_path=str(tok.path), eos_id=tok.eos_id)
        kwargs = dict(**where, index_dir=d.index_dir, **common)
        names, weights = [s.name for s in specs], [s.weight for s in specs]
    else:
        kwargs = dict(folder=str(folder), split="train", url_prefix=d.url_prefix or None, **common)
        names, weights = ["dataset"], [1.0]
    loader = StatefulLoader(kwargs, d.num_workers)
    rows, sources = [], []
    try:
        for _ in range(num_batches):
            batch = next(loader)
            rows.append(_rows(batch))
            sources.append(loader.last_state.get("row_sources", [0] * batch.tokens.shape[0]))
    finally:
        loader.close()
    return np.stack(rows), np.asarray(sources), names, weights, tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.inspect_data", description=__doc__)
    p.add_argument("--config", required=True, help="the job's TOML file")
    p.add_argument("--batches", type=int, default=20, help="batches to read (rank 0's)")
    p.add_argument("--decode", type=int, default=2, help="rows to print as text")
    p.add_argument("--dump", default="", help="write tokens and sources to this .npz")
    p.add_argument("--world_size", type=int, default=1, help="the job's world size (DP degree)")
    ns, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(ns.config, overrides)
        rows, sources, names, weights, tok = inspect(cfg, ns.batches, ns.world_size)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    per_row = rows.shape[2] - 1  # tokens trained per row
    total = rows.shape[0] * rows.shape[1] * per_row
    share = {n: float((sources == i).sum() * per_row / total) for i, n in enumerate(names)}
    print(f"{rows.shape[0]} batches x {rows.shape[1]} rows x {per_row} tokens (rank 0)")
    for i, name in enumerate(names):
        lengths = _segments(rows[sources == i], tok.eos_id)
        print(f"{name}: share {share[name]:.3f} (weight {weights[i] / sum(weights):.3f})")
        print(f"  document lengths: {_histogram(lengths)}")
    flat_rows, flat_sources = rows.reshape(-1, rows.shape[2]), sources.reshape(-1)
    for r in range(min(ns.decode, flat_rows.shape[0])):
        text = tok.decode(flat_rows[r].tolist())
        print(f"--- row {r} ({names[int(flat_sources[r])]}) ---\n{text[:2000]}")
    if ns.dump:
        token_sources = np.broadcast_to(sources[..., None], rows.shape).astype(np.int64)
        np.savez(ns.dump, tokens=rows.astype(np.int64), sources=token_sources)
        print(f"wrote {ns.dump}")
    print(json.dumps({"tokens": int(total), "share": share}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
