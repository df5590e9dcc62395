"""Steady-state step of our trainer against a bare PyTorch loop: same model, batch and optimizers.

The trainer step includes everything it does per step (data loader with hashing workers, LR set, NaN
check, clipping, MoE bias update, metrics bookkeeping). The bare loop reuses in-memory batches
and only runs forward, backward and the optimizer steps. Rounds alternate to share the machine's
noise. The last line is ``overhead_ratio: R`` (target <= 1.05).
Run: .venv/bin/python -m benchmarks.trainer_overhead [--config pretrain/configs/demo.toml]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import bench_overrides, print_table
from pretrain.config import load_config
from pretrain.optimizer import Optimizers
from pretrain.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="pretrain/configs/demo.toml")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    ns, extra = parser.parse_known_args()
    dump = tempfile.mkdtemp(prefix="overhead_")
    cfg = load_config(ns.config, [*bench_overrides(dump), *extra])
    trainer = Trainer(cfg)
    model = trainer.inner
    bare_opt = Optimizers(model, cfg.optimizer)
    batches = [next(trainer.loader).to(trainer.device) for _ in range(4)]

    def bare_step(i: int) -> None:
        batch = batches[i % len(batches)]
        out = model(
            batch.tokens, positions=batch.positions, doc_ids=batch.doc_ids, engram=batch.engram
        )
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch.labels.flatten())
        loss = loss + sum(out.aux_losses.values()) if out.aux_losses else loss
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad()

    ours, bare = [], []
    for _ in range(2):  # warm-up of both paths
        trainer.train_step()
        bare_step(0)
    for _ in range(ns.rounds):
        for _ in range(ns.steps):
            start = time.perf_counter()
            trainer.train_step()
            ours.append(time.perf_counter() - start)
        for i in range(ns.steps):
            start = time.perf_counter()
            bare_step(i)
            bare.append(time.perf_counter() - start)
    trainer.loader.close()
    tokens = cfg.training.batch_size * cfg.data.seq_len * cfg.training.grad_accum_steps
    t_ours, t_bare = statistics.median(ours), statistics.median(bare)
    print_table(
        ["loop", "median s/step", "tokens/s"],
        [["trainer", t_ours, tokens / t_ours], ["bare", t_bare, tokens / t_bare]],
    )
    print(f"threads: {torch.get_num_threads()}  flavor: {cfg.model.flavor}")
    print(f"overhead_ratio: {t_ours / t_bare:.3f}")


if __name__ == "__main__":
    main()
