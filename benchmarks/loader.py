"""Loader throughput with Engram hashing in the workers, for 0, 1 and 2 workers, against what
the demo model consumes per second (measured in the same run).

Run: .venv/bin/python -m benchmarks.loader [--data data_cache/demo]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import print_table
from data.loader import StatefulLoader
from data.tokenizer import load_tokenizer
from models.transformer import build_model
from pretrain.builders import build_hasher, build_model_args
from pretrain.config import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data_cache/demo")
    parser.add_argument("--batches", type=int, default=60)
    ns = parser.parse_args()
    tokenizer = load_tokenizer(f"{ns.data}/tokenizer.model")
    args = build_model_args(ModelConfig(flavor="demo"), tokenizer, 256)
    hasher = build_hasher(args, tokenizer)
    kwargs = dict(
        folder=ns.data,
        split="train",
        batch_size=8,
        seq_len=256,
        vocab_size=tokenizer.vocab_size,
        hasher=hasher,
    )
    rows = []
    tokens_per_batch = 8 * 256
    for workers in (0, 1, 2):
        loader = StatefulLoader(kwargs, num_workers=workers)
        next(loader)  # start-up (worker spawn, first shard read) is not steady state
        start = time.perf_counter()
        for _ in range(ns.batches):
            next(loader)
        seconds = time.perf_counter() - start
        rows.append([f"loader, {workers} workers", tokens_per_batch * ns.batches / seconds])
        loader.close()
    model = build_model(args)
    batch = next(StatefulLoader(kwargs, num_workers=0))

    def step():
        out = model(
            batch.tokens, positions=batch.positions, doc_ids=batch.doc_ids, engram=batch.engram
        )
        F.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten()).backward()

    step()
    start = time.perf_counter()
    for _ in range(3):
        step()
    consume = 3 * tokens_per_batch / (time.perf_counter() - start)
    rows.append(["demo model fwd+bwd consumes", consume])
    print_table(["what", "tokens/s"], rows)
    print(
        f"loader_1_worker_vs_model: {rows[1][1] / consume:.1f}x  threads: {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
