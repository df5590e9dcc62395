"""Engram-table parallelism traffic on real text, with and without per-owner deduplication, and the
tokens/s of a combined layout on CPU.

Bytes per step for one rank's batch (demo corpus, the demo flavor's hasher: 2 layers x 8 heads of
32-dim rows): ids sent to owners (int64) and rows returned (float32); gradients go
back with the same volume as the rows. "remote" leaves out the rows a rank owns itself.
Run: .venv/bin/python -m benchmarks.engram_comm [--data data_cache/demo]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from benchmarks.common import print_table
from data.loader import StatefulLoader
from data.tokenizer import load_tokenizer
from parallel.engram_table_parallel import build_shard_plan, row_bounds
from pretrain.builders import build_hasher, build_model_args
from pretrain.config import ModelConfig


def traffic_rows(data: str, batches: int) -> list[list]:
    tokenizer = load_tokenizer(f"{data}/tokenizer.model")
    args = build_model_args(ModelConfig(flavor="demo"), tokenizer, 256)
    hasher = build_hasher(args, tokenizer)
    loader = StatefulLoader(
        dict(
            folder=data,
            split="train",
            batch_size=8,
            seq_len=256,
            vocab_size=tokenizer.vocab_size,
            hasher=hasher,
        ),
        num_workers=0,
    )
    head_dim = args.engram.head_dim
    rows = []
    samples = [next(loader) for _ in range(batches)]
    for owners in (2, 4, 8):
        totals = np.zeros(4)
        for batch in samples:
            for layer, inputs in batch.engram.items():
                flat = inputs.hash_ids.numpy() + hasher.head_offsets(layer)
                bounds = row_bounds(hasher.num_rows(layer), owners)
                plan = build_shard_plan(flat, bounds)
                lookups, unique = flat.size, plan.unique_ids.size
                remote = unique - plan.send_counts[0]  # as rank 0: its own rows stay local
                totals += [
                    lookups * (8 + 4 * head_dim),
                    unique * (8 + 4 * head_dim),
                    remote * (8 + 4 * head_dim),
                    unique / lookups,
                ]
        per_step = totals / len(samples)
        rows.append(
            [
                owners,
                per_step[0] / 2**20,
                per_step[1] / 2**20,
                per_step[2] / 2**20,
                per_step[3] / len(args.engram.layer_ids),
            ]
        )
    return rows


def _fit(rank, world, data, dump, layout, steps):
    from pretrain.config import load_config
    from pretrain.train import Trainer

    overrides = [
        f"--job.dump_folder={dump}",
        f"--data.dataset_path={data}",
        "--data.mixture=[]",  # the one folder given
        f"--training.steps={steps}",
        "--checkpoint.enable=false",
        "--metrics.enable_tensorboard=false",
        "--metrics.progress_bar=false",
        "--metrics.log_freq=1000",
        "--metrics.eval_freq=100000",
        "--lr_scheduler.warmup_steps=1",
        "--data.num_workers=0",
        "--downstream.tasks=",
        "--downstream.interval=0",
    ]
    overrides += [f"--parallelism.{k}={v}" for k, v in layout.items()]
    trainer = Trainer(load_config("pretrain/configs/demo.toml", overrides))
    trainer.train_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps - 1):
        trainer.train_step()
    seconds = time.perf_counter() - start
    tokens = (steps - 1) * trainer.cfg.training.batch_size * trainer.cfg.data.seq_len
    return tokens * trainer.dims.dp_degree / seconds


def layout_rows(data: str, steps: int) -> list[list]:
    from tests.distributed.helpers import run_ranks

    layouts = {
        "single process": (1, {}),
        "TP2 x DP2 (FSDP) x EP2 x tables2": (
            4,
            dict(
                tensor_parallel_degree=2,
                data_parallel_shard_degree=2,
                expert_parallel_degree=2,
                engram_shard_degree=2,
            ),
        ),
    }
    rows = []
    for name, (world, layout) in layouts.items():
        dump = tempfile.mkdtemp(prefix="comm_")
        if world == 1:
            tps = _fit(0, 1, data, dump, layout, steps)
        else:
            tps = run_ranks(_fit, world, data, dump, layout, steps)[0]
        rows.append([name, world, tps])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data_cache/demo")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    ns = parser.parse_args()
    rows = traffic_rows(ns.data, ns.batches)
    print_table(
        [
            "owners",
            "MiB/step no dedup",
            "MiB/step dedup",
            "MiB/step dedup remote",
            "unique/lookups",
        ],
        rows,
    )
    print_table(
        ["layout (demo flavor, batch 8x256 per replica)", "ranks", "tokens/s"],
        layout_rows(ns.data, ns.steps),
    )
    print(f"dedup_saving_8_owners: {rows[-1][1] / rows[-1][2]:.2f}x")


if __name__ == "__main__":
    main()
