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
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from models.derive import EXPERIMENTS, Arm, check, derive
from pretrain.config import apply, load_config, to_toml

BASE_CONFIG = "pretrain/configs/demo.toml"
# training tokens per run when neither --steps nor --tokens is given: xs is sized for the 2-core
# CPU machine (iso_flop, 3 seeds, two runs side by side: about an hour), m for one GPU
DEFAULT_TOKENS = {"xs": 1_200_000, "s": 204_800, "m": 50_000_000}


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


def corpus_vocab(corpus: Path) -> int:
    from data.tokenizer import load_tokenizer

    candidates = [corpus / "tokenizer.model", corpus / "tokenizer.json"]
    found = [c for c in candidates if c.is_file()]
    if not (corpus / "manifest.json").is_file() or not found:
        raise SystemExit(
            f"error: {corpus} is not a prepared corpus (needs manifest.json and a tokenizer); "
            "build one with python -m data.prepare --out DIR --input FILES"
        )
    return load_tokenizer(found[0]).vocab_size


def run_config(ns, arm: Arm, seed: int, folder: Path):
    cfg = load_config(
        ns.config,
        [
            f"--job.dump_folder={folder}",
            f"--job.description={ns.experiment} {arm.name} seed {seed}",
            f"--data.dataset_path={ns.corpus}",
            "--data.mixture=[]",  # the arms train on --corpus alone (the base config may blend)
            "--data.prepare_if_missing=false",
            f"--data.seq_len={ns.seq_len}",
            f"--model.flavor={arm.flavor}",
            f"--training.steps={ns.steps}",
            f"--training.seed={seed}",
            f"--training.batch_size={ns.batch_size}",
            f"--optimizer.lr={ns.lr}",
            f"--lr_scheduler.warmup_steps={ns.steps // 10}",
            f"--checkpoint.interval={max(1, ns.steps // 4)}",
            "--checkpoint.keep_last=1",
            f"--metrics.eval_freq={ns.steps}",
            f"--metrics.eval_batches={ns.eval_batches}",
            f"--metrics.log_freq={max(1, ns.steps // 10)}",
            "--metrics.progress_bar=false",
            f"--training.num_threads={ns.threads}",
            f"--training.device={ns.device}",
            f"--training.mixed_precision={'bf16' if ns.device == 'cuda' else 'none'}",
        ],
    )
    for key, value in arm.overrides.items():
        apply(cfg, "model", f"overrides.{key}", value)
    if ns.nproc > 1 and arm.table_rows:  # FSDP cannot take whole tables: the ranks shard them
        cfg.parallelism.engram_shard_degree = ns.nproc
    cfg.model.overrides["max_seq_len"] = max(ns.seq_len, 256)
    return cfg


def train_run(ns, arm: Arm, seed: int, folder: Path) -> dict:
    """Train one arm x seed here (resuming a checkpoint there); its ``result.json``."""
    from pretrain.rowwise_adam import RowwiseAdam
    from pretrain.train import Trainer

    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.perf_counter()
    trainer = Trainer(run_config(ns, arm, seed, folder))
    summary = trainer.fit()
    trainer.loader.close()
    cfg = trainer.cfg
    tables = [o for o in trainer.optimizers.optimizers if isinstance(o, RowwiseAdam)]
    touched, rows = tables[0].rows_touched() if tables else (0, 0)
    result = {
        "val_loss": summary["val_loss"],
        "rows_touched": touched / rows if rows else None,  # fraction of table rows trained
        "val_windows": trainer.validator.window_losses,  # per batch: paired comparisons
        "tokens": cfg.training.steps * cfg.training.batch_size * cfg.data.seq_len,
        "seconds": time.perf_counter() - start,
    }
    done.write_text(json.dumps(result) + "\n")
    return result


def _train_one(job) -> tuple[int, dict]:
    index, ns, arm, seed, folder = job
    return index, train_run(ns, arm, seed, Path(folder))


def run_all(ns, runs: list[tuple[Arm, int, Path]]) -> list[dict]:
    """Train every arm x seed here, ``ns.parallel`` at a time (spawned processes, each at
    ``ns.threads`` torch threads), in the order given; results in that order."""
    jobs = [(i, ns, arm, seed, str(folder)) for i, (arm, seed, folder) in enumerate(runs)]
    for i, (arm, seed, folder) in enumerate(runs):
        print(f"[{i + 1}/{len(runs)}] {arm.name} seed {seed} -> {folder}", flush=True)
    out: list[dict | None] = [None] * len(runs)

    def finished(index: int, result: dict) -> None:
        arm, seed, _ = runs[index]
        out[index] = result
        loss = result["val_loss"]
        print(f"[{index + 1}/{len(runs)}] {arm.name} seed {seed}: val_loss {loss:.4f}", flush=True)

    if ns.parallel == 1:
        for job in jobs:
            finished(*_train_one(job))
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # not a multiprocessing.Pool: its daemonic workers could not start the loader's processes
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(ns.parallel, mp_context=context) as pool:
        for future in as_completed([pool.submit(_train_one, job) for job in jobs]):
            finished(*future.result())
    return out


def write_slurm(ns, runs: list[tuple[Arm, int, Path]], out: Path) -> Path:
    lines = []
    for arm, seed, folder in runs:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(to_toml(run_config(ns, arm, seed, folder)))
        lines.append(str(folder / "config.toml"))
    (out / "sweep_configs.txt").write_text("\n".join(lines) + "\n")
    script = out / "sweep.sbatch"
    script.write_text(
        f"""#!/bin/bash
#SBATCH --job-name=engram-{ns.experiment}
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --output={out}/logs/%A_%a.out
# one arm x seed per array task; re-submitting resumes unfinished runs from their checkpoints
CONFIG=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {out}/sweep_configs.txt)
torchrun --standalone --nproc_per_node=1 -m pretrain.train --config "$CONFIG"
"""
    )
    return script


def collect_run(folder: Path) -> dict | None:
    """A run trained elsewhere (torchrun, slurm): its final validation loss from
    ``metrics.jsonl`` and its validation windows from ``val_windows.json`` (what the trainer
    writes at each evaluation)."""
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        return None
    evals = [json.loads(line) for line in metrics.read_text().splitlines() if "val_loss" in line]
    if not evals:
        return None
    result = {"val_loss": evals[-1]["val_loss"], "tokens": None}
    windows = folder / "val_windows.json"
    if windows.is_file():
        record = json.loads(windows.read_text())
        if record["step"] == evals[-1]["step"]:
            result["val_windows"] = record["val_windows"]
    return result


def torchrun_all(ns, runs: list[tuple[Arm, int, Path]]) -> list[dict | None]:
    """Train every arm x seed with ``torchrun --nproc_per_node=ns.nproc`` (one after another;
    an interrupted run resumes from its checkpoint), then collect them."""
    import subprocess

    out = []
    for i, (arm, seed, folder) in enumerate(runs):
        done = folder / "result.json"
        if not done.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "config.toml"
            config.write_text(to_toml(run_config(ns, arm, seed, folder)))
            print(
                f"[{i + 1}/{len(runs)}] {arm.name} seed {seed}: torchrun x {ns.nproc}", flush=True
            )
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",  # torchrun, from this interpreter's environment
                "--standalone",
                f"--nproc_per_node={ns.nproc}",
                "-m",
                "pretrain.train",
                "--config",
                str(config),
            ]
            if subprocess.run(command, check=False).returncode != 0:
                raise SystemExit(
                    f"error: {arm.name} seed {seed} failed (see {folder}); fix it and run the "
                    "same command again: finished runs are kept, this one resumes"
                )
            result = collect_run(folder)
            result["tokens"] = ns.steps * ns.batch_size * ns.seq_len
            done.write_text(json.dumps(result) + "\n")
        out.append(collect_run(folder))
    return out


def results(ns, arms: list[Arm], vocab: int, per_arm: dict[str, list[dict]]) -> dict:
    out = {"experiment": ns.experiment, "size": ns.size, "steps": ns.steps, "seeds": ns.seeds}
    rows = []
    for arm in arms:
        acc = arm.accounting(vocab, ns.seq_len)
        runs = per_arm[arm.name]
        row = {"name": arm.name}
        if ns.experiment == "allocation":
            row["rho"] = arm.rho
        else:
            row["table_rows"] = arm.table_rows
        row.update(
            total_params=acc.total_params,
            activated_params=acc.activated_params,
            engram_params=acc.engram_params,
            flops_per_token=acc.flops_per_token,
            flops_per_token_measured=arm.measured_flops_per_token,
            tokens=runs[0].get("tokens") if runs else None,
            val_loss=[r["val_loss"] for r in runs],
            val_windows=[r.get("val_windows") or [r["val_loss"]] for r in runs],
            seconds=[r.get("seconds") for r in runs],
            rows_touched=[r.get("rows_touched") for r in runs],
        )
        rows.append(row)
    out["arms"] = rows
    out["comparisons"] = comparisons(rows)
    return out


def paired_bootstrap(
    a: list[list[float]], b: list[list[float]], resamples: int = 4000, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """Mean of ``a - b`` over seeds x validation windows (both arms trained with the same seeds
    and evaluated on the same windows: each cell is paired) and its 95 % interval from a
    two-level bootstrap: seeds resampled, then windows, with replacement."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # [S, W]
    seeds, windows = diff.shape
    rng = np.random.default_rng(seed)
    pick_s = rng.integers(0, seeds, (resamples, seeds))
    pick_w = rng.integers(0, windows, (resamples, windows))
    means = diff[pick_s[:, :, None], pick_w[:, None, :]].mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), (float(low), float(high))


def verdict(interval: tuple[float, float]) -> str:
    """Lower loss is better: ``a - b`` wholly below 0 -> "A better", above -> "B better"."""
    low, high = interval
    return "A better" if high < 0 else "B better" if low > 0 else "undecided"


def comparisons(rows: list[dict]) -> list[dict]:
    """Every arm against the first (the MoE arm, rho = 1, or the smallest table), where both
    have the same seeds and windows."""
    out = []
    first = rows[0] if rows else None
    for row in rows[1:]:
        a, b = row.get("val_windows") or [], first.get("val_windows") or []
        shapes = {np.shape(a), np.shape(b)}
        if not a or not b or len(shapes) != 1:
            continue
        diff, interval = paired_bootstrap(a, b)
        out.append(
            {
                "a": row["name"],
                "b": first["name"],
                "diff_mean": diff,
                "ci95": list(interval),
                "verdict": verdict(interval),
            }
        )
    return out


def summary_stats(losses: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(losses)
    return mean, statistics.stdev(losses) if len(losses) > 1 else 0.0


def fit_log_linear(rows: list[dict]) -> tuple[float, float, float]:
    """Least squares of mean loss on log10(rows): (slope, intercept, R^2)."""
    xs = [math.log10(r["table_rows"]) for r in rows]
    ys = [summary_stats(r["val_loss"])[0] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-30
    return slope, intercept, 1 - ss_res / ss_tot


def plot(res: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[analysis]'): no plot written")
        return None
    rows = [r for r in res["arms"] if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    means, stds = [], [[], []]  # error bars: each arm's 95 % interval (bootstrap)
    for r in rows:
        mean, (low, high) = arm_interval(r)
        means.append(mean)
        stds[0].append(mean - low)
        stds[1].append(high - mean)
    if res["experiment"] == "allocation":
        xs = [100 * r["rho"] for r in rows]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3)
        ax.set_xlabel("rho: share of the sparse budget kept by experts (%)")
    elif res["experiment"] == "memory_scaling":
        xs = [r["table_rows"] for r in rows]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, linestyle="none")
        ax.set_xscale("log")
        if len(rows) >= 2:
            slope, intercept, r2 = fit_log_linear(rows)
            line = [slope * math.log10(x) + intercept for x in xs]
            ax.plot(xs, line, label=f"slope {slope:.4f} per decade, R² {r2:.3f}")
            ax.legend()
        ax.set_xlabel("Engram table rows (all layers)")
    else:
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r["val_loss"]), r["val_loss"], alpha=0.5)
            yerr = [[stds[0][i]], [stds[1][i]]]
            ax.errorbar([i], [means[i]], yerr=yerr, marker="_", markersize=20, capsize=6)
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows])
    ax.set_ylabel("validation loss")
    ax.set_title(f"{res['experiment']} (size {res['size']}, {res['steps']} steps)")
    fig.tight_layout()
    path = out / f"{res['experiment']}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def arm_interval(row: dict) -> tuple[float, tuple[float, float]]:
    """An arm's mean validation loss over seeds x windows and its 95 % bootstrap interval."""
    windows = row.get("val_windows") or [[v] for v in row["val_loss"]]
    return paired_bootstrap(windows, np.zeros_like(np.asarray(windows, dtype=np.float64)))


def report(res: dict, checks: list[str], out: Path, png: Path | None) -> str:
    lines = [f"# {res['experiment']} (size {res['size']}, {res['steps']} steps)", ""]
    lines += ["Accounting (relative to the first arm):", "", "```", *checks, "```", ""]
    lines += [
        "| arm | val loss (mean +- std) | seeds | tokens | table rows trained |",
        "|---|---|---|---|---|",
    ]
    for r in res["arms"]:
        if not r["val_loss"]:
            lines.append(f"| {r['name']} | (not run) | 0 | - | - |")
            continue
        mean, std = summary_stats(r["val_loss"])
        touched = [t for t in r.get("rows_touched") or [] if t is not None]
        trained = f"{100 * statistics.fmean(touched):.1f} %" if touched else "-"
        lines.append(
            f"| {r['name']} | {mean:.4f} +- {std:.4f} | {len(r['val_loss'])} | {r['tokens']} "
            f"| {trained} |"
        )
    rows = [r for r in res["arms"] if r["val_loss"]]
    if res.get("comparisons"):
        lines += [
            "",
            "Each arm against the first: mean loss difference (a minus b) over seeds x "
            "validation windows, with its 95 % paired bootstrap interval:",
            "",
            "| a | b | a - b | 95 % interval | verdict |",
            "|---|---|---|---|---|",
        ]
        for c in res["comparisons"]:
            low, high = c["ci95"]
            lines.append(
                f"| {c['a']} | {c['b']} | {c['diff_mean']:+.4f} | [{low:+.4f}, {high:+.4f}] "
                f"| {c['verdict']} |"
            )
    if res["experiment"] == "allocation" and rows:
        best = min(rows, key=lambda r: summary_stats(r["val_loss"])[0])
        lines += ["", f"Minimum at rho = {best['rho']:.2f}."]
    if res["experiment"] == "memory_scaling" and len(rows) >= 2:
        slope, _, r2 = fit_log_linear(rows)
        lines += ["", f"Log-linear fit: slope {slope:.4f} per decade of rows, R² {r2:.3f}."]
    if png is not None:
        lines += ["", f"![{res['experiment']}]({png.name})"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


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
