"""``python -m launch.experiments {iso_flop,allocation,memory_scaling} --corpus DIR --out DIR
[--steps N | --tokens N] --seeds 0,1,2 [--size xs|s|m] [--device cuda]
[--launcher torchrun --nproc N]``

The paper's three comparisons at small scale. Arms are derived from a budget
(``models/derive.py``) and checked against ``models.accounting`` (printed; an iso-parameter or
iso-FLOP arm off by more than 1% stops the sweep). Every arm x seed is one training job in
``<out>/runs/<arm>/seed<S>/``:

- ``--launcher serial`` (default) trains them one after another here. A finished run leaves
  ``result.json`` and is skipped next time; an interrupted one resumes from its checkpoint, so
  re-running the command finishes a half-done sweep.
- ``--launcher torchrun --nproc N`` trains each run across N processes (GPUs) of this node
  with ``torchrun``, one run after another, resuming as the serial launcher does.
- ``--device cuda`` (or ``auto`` on a GPU) trains every run on the GPU in bf16, with the flex
  attention path. Without ``--steps`` or ``--tokens`` a run trains the size's budget
  (``DEFAULT_TOKENS``: xs 1.2M tokens, s 205K, m 50M).
- ``--launcher slurm`` writes ``<out>/sweep.sbatch``, one array task per arm x seed (each a
  ``torchrun`` of ``pretrain.train`` with the run's ``config.toml``), and exits. Submit it, then
  run the same command with ``--launcher collect`` to gather the results.

Writes ``<out>/results.json`` (``{"experiment", "arms": [{"name", "rho" or "table_rows",
"total_params", "activated_params", "engram_params", "flops_per_token",
"flops_per_token_measured" (``models.flop_count``), "tokens",
"val_loss": [one per seed]}]}``), PNG plots (needs the ``[analysis]`` extra: matplotlib) and
``<out>/report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from launch.experiment_report import plot, report, results
from launch.experiment_runs import (
    BASE_CONFIG,
    DEFAULT_TOKENS,
    collect_run,
    corpus_vocab,
    run_all,
    torchrun_all,
    write_slurm,
)
from models.derive import EXPERIMENTS, check, derive


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.experiments", description=__doc__)
    p.add_argument("experiment", choices=EXPERIMENTS)
    p.add_argument("--corpus", required=True, help="a data.prepare output folder")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=0, help="training steps per run")
    p.add_argument(
        "--tokens",
        type=int,
        default=0,
        help="training tokens per run (sets --steps); neither: the size's budget (DEFAULT_TOKENS)",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", default="s", choices=("xs", "s", "m"))
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--eval_tokens",
        type=int,
        default=262_144,
        help="validation tokens per run, the same windows for every arm (at least 256K)",
    )
    p.add_argument("--eval_batches", type=int, default=0, help="overrides --eval_tokens")
    p.add_argument(
        "--downstream",
        default="",
        help="olmo-eval tasks or suites scored after each run (e.g. small): paired verdicts",
    )
    p.add_argument("--downstream_examples", type=int, default=200, help="questions per task")
    p.add_argument(
        "--launcher", default="serial", choices=("serial", "torchrun", "slurm", "collect")
    )
    p.add_argument("--nproc", type=int, default=1, help="torchrun: processes (GPUs) per run")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="training.device of every run; cuda (or auto on a GPU) also trains in bf16, with "
        "the flex attention path",
    )
    p.add_argument(
        "--parallel", type=int, default=1, help="serial launcher: runs at once (processes)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per run (0: torch's default, or cores / --parallel)",
    )
    p.add_argument("--config", default=BASE_CONFIG, help="base job config the arms override")
    ns = p.parse_args(argv)
    ns.seeds = [int(s) for s in ns.seeds.split(",") if s != ""]
    if not ns.tokens and not ns.steps:
        ns.tokens = DEFAULT_TOKENS[ns.size]
    if ns.tokens:
        ns.steps = max(1, -(-ns.tokens // (ns.batch_size * ns.seq_len)))
    if ns.device == "auto" and ns.launcher == "slurm":
        ns.device = "cuda"  # the array tasks ask for GPUs
    elif ns.device == "auto":
        import torch

        ns.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ns.device == "cuda" and ns.launcher == "serial":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no GPU here; use --device cpu, or run on a GPU")
    if ns.nproc < 1:
        p.error("--nproc must be at least 1")
    if ns.parallel < 1:
        p.error("--parallel must be at least 1")
    if not ns.threads and ns.parallel > 1:  # 0 with one run: torch's default
        ns.threads = max(1, (os.cpu_count() or 1) // ns.parallel)
    if not ns.eval_batches:
        ns.eval_batches = -(-ns.eval_tokens // (ns.batch_size * ns.seq_len))
    if not ns.seeds:
        p.error("--seeds needs at least one seed, e.g. 0,1,2")
    return ns


def main(argv=None) -> int:
    ns = parse(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = corpus_vocab(Path(ns.corpus))
    arms = derive(ns.experiment, ns.size, vocab, ns.seq_len)
    checks = check(ns.experiment, arms, vocab, ns.seq_len)
    print("\n".join(checks), flush=True)
    runs = [(a, s, out / "runs" / a.name / f"seed{s}") for a in arms for s in ns.seeds]
    if ns.launcher == "slurm":
        print(
            f"wrote {write_slurm(ns, runs, out)}; submit it, then run again with --launcher collect"
        )
        return 0
    per_arm: dict[str, list[dict]] = {a.name: [] for a in arms}
    if ns.launcher == "collect":
        done = [collect_run(folder) for _, _, folder in runs]
    elif ns.launcher == "torchrun":
        done = torchrun_all(ns, runs)
    else:
        done = run_all(ns, runs)
    for (arm, _, _), result in zip(runs, done, strict=True):
        if result is not None:
            per_arm[arm.name].append(result)
    res = results(ns, arms, vocab, per_arm)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    png = plot(res, out)
    print(report(res, checks, out, png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
