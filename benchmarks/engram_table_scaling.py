"""Engram layer step cost as the table grows x1, x10, x100: sparse row-wise path against dense.

One step = forward + backward + optimizer step of one Engram layer (paper variant, hc_mult 4) with a
fixed batch; only the table size changes. Sparse: sparse table gradients + RowwiseAdam. Dense: dense
gradients + AdamW on the table. Target: the sparse x100/x1 ratio <= 1.2.
Run: .venv/bin/python -m benchmarks.engram_table_scaling [--base_rows 100000]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import print_table, time_calls
from data.ngram_hash import EngramHashSpec
from models.args import EngramConfig
from models.engram import Engram
from pretrain.rowwise_adam import RowwiseAdam


def build(rows_per_head: int, sparse: bool):
    spec = EngramHashSpec(
        layer_ids=[0], engram_vocab_size=[rows_per_head] * 2, max_ngram_size=3, n_head_per_ngram=4
    )
    cfg = EngramConfig(hash=spec, n_embed_per_ngram=128, sparse_grad=sparse)
    module = Engram(cfg, 0, dim=128, hc_mult=4, table_sizes=cfg.table_sizes()[0])
    torch.manual_seed(0)
    module.init_weights()
    table = [module.table.weight]
    rest = [p for n, p in module.named_parameters() if n != "table.weight"]
    opt_rest = torch.optim.AdamW(rest, lr=1e-3, foreach=False)
    opt_table = (
        RowwiseAdam(table, lr=5e-3)
        if sparse
        else torch.optim.AdamW(table, lr=5e-3, weight_decay=0.0, foreach=False)
    )
    return module, (opt_rest, opt_table)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--base_rows", type=int, default=12_500, help="rows per head at x1 (8 heads)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    ns = parser.parse_args()
    batch, seq = 4, 512
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq, 4, 128, generator=g)
    rows = []
    sparse_times = {}
    for scale in (1, 10, 100):
        rows_per_head = ns.base_rows * scale
        for sparse in (True, False):
            module, opts = build(rows_per_head, sparse)
            ids = torch.randint(0, ns.base_rows, (batch, seq, 8), generator=g)

            def step(module=module, opts=opts, ids=ids):
                out = module(hidden, ids)
                out.square().mean().backward()
                for opt in opts:
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            seconds = time_calls(step, repeats=ns.repeats, warmup=2)
            if sparse:
                sparse_times[scale] = seconds
            rows.append(
                [f"x{scale}", module.table.num_rows, "sparse" if sparse else "dense", seconds * 1e3]
            )
            del module, opts
    print_table(["scale", "table rows", "path", "ms/step"], rows)
    print(f"ratio_x10_vs_x1: {sparse_times[10] / sparse_times[1]:.3f}")
    print(f"ratio_x100_vs_x1: {sparse_times[100] / sparse_times[1]:.3f}")


if __name__ == "__main__":
    main()
