"""The runs of ``launch.experiments``: each arm x seed's job config, and the launchers that train
them (serial in this process's pool, ``torchrun`` per run, or a slurm array file collected
later). A finished run leaves ``result.json``; an interrupted one resumes from its checkpoint."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from models.derive import Arm
from pretrain.config import apply, load_config, to_toml

BASE_CONFIG = "pretrain/configs/demo.toml"
# training tokens per run when neither --steps nor --tokens is given: xs is sized for the 2-core
# CPU machine (iso_flop, 3 seeds, two runs side by side: about an hour), m for one GPU
DEFAULT_TOKENS = {"xs": 1_200_000, "s": 204_800, "m": 50_000_000}


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
    # downstream tasks only where --downstream asks (the base config's own are not inherited),
    # scored once, after the last step
    cfg.downstream.tasks = ns.downstream
    cfg.downstream.interval = ns.steps if ns.downstream else 0
    cfg.downstream.max_examples = ns.downstream_examples
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
        "downstream": _downstream(folder),
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
    result = {"val_loss": evals[-1]["val_loss"], "tokens": None, "downstream": _downstream(folder)}
    windows = folder / "val_windows.json"
    if windows.is_file():
        record = json.loads(windows.read_text())
        if record["step"] == evals[-1]["step"]:
            result["val_windows"] = record["val_windows"]
    return result


def _downstream(folder: Path) -> dict[str, list[float]]:
    """``{"<task>/<metric>": [value of each question]}`` of the run's last downstream
    evaluation (``downstream_questions.json``; empty without one)."""
    path = folder / "downstream_questions.json"
    if not path.is_file():
        return {}
    tasks = json.loads(path.read_text())["tasks"]
    return {f"{t}/{m}": values for t, metrics in tasks.items() for m, values in metrics.items()}


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
