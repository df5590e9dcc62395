"""FP8 against BF16: the loss curves of the ``debug`` Engram-MoE flavor trained both ways.

Both arms train with BF16 autocast from the same seed on the same batches; the FP8 arm adds
``[quantize.linear.float8]`` (rowwise, emulated on CPU: the same quantised products in high
precision) and ``quantize.engram = true``. The table gives the training loss averaged over each
window of steps and the final held-out loss. On CPU the FP8 arm is slower (emulation adds casts
and does no FP8 GEMM): its speed is measured on a GPU (scripts/gpu_check.sh).

Run: .venv/bin/python -m benchmarks.fp8 [--dataset data_cache/demo] [--steps 300] [--every 50]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table

FP8 = ["--quantize.linear.float8.enable=true", "--quantize.engram=true"]


def loss_curves(
    dataset, folder, steps: int = 300, threads: int = 1, batch: int = 4
) -> dict[str, dict]:
    """Train the BF16 and the FP8 arm; for each: ``losses`` (step -> training loss),
    ``val_loss`` (held-out, after the last step) and ``seconds``."""
    from pretrain.config import load_config
    from pretrain.train import Trainer

    curves = {}
    for arm, extra in (("bf16", []), ("fp8", FP8)):
        dump = Path(folder) / arm
        cfg = load_config(
            "pretrain/configs/debug.toml",
            [
                f"--job.dump_folder={dump}",
                f"--data.dataset_path={dataset}",
                "--data.prepare_if_missing=false",
                "--data.seq_len=64",
                "--data.num_workers=0",
                f"--training.batch_size={batch}",
                f"--training.steps={steps}",
                "--training.mixed_precision=bf16",
                f"--training.num_threads={threads}",
                "--lr_scheduler.warmup_steps=20",
                "--checkpoint.enable=false",
                "--metrics.log_freq=1",
                f"--metrics.eval_freq={steps}",
                "--metrics.eval_batches=8",
                "--metrics.enable_tensorboard=false",
                "--metrics.progress_bar=false",
                *extra,
            ],
        )
        start = time.perf_counter()
        print(f"training the {arm} arm ({steps} steps) ...", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):  # the per-step console lines
            summary = Trainer(cfg).fit()
        seconds = time.perf_counter() - start
        losses = {}
        for line in (dump / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                losses[record["step"]] = record["loss"]
        curves[arm] = {"losses": losses, "val_loss": summary["val_loss"], "seconds": seconds}
    return curves


def window_means(losses: dict[int, float], every: int) -> dict[int, float]:
    """The mean training loss over each window of ``every`` steps, keyed by its last step."""
    last = max(losses)
    return {
        end: sum(losses[s] for s in range(end - every + 1, end + 1)) / every
        for end in range(every, last + 1, every)
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="data_cache/demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    ns = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        curves = loss_curves(ns.dataset, folder, ns.steps, ns.threads)
    bf16, fp8 = (window_means(curves[arm]["losses"], ns.every) for arm in ("bf16", "fp8"))
    rows = [[f"{end - ns.every + 1}-{end}", bf16[end], fp8[end]] for end in bf16]
    rows = [row + [f"{(row[2] / row[1] - 1) * 100:+.2f}%"] for row in rows]
    val = [curves[arm]["val_loss"] for arm in ("bf16", "fp8")]
    rows.append(["held-out", *val, f"{(val[1] / val[0] - 1) * 100:+.2f}%"])
    print_table(["steps", "bf16 loss", "fp8 loss", "fp8 / bf16 - 1"], rows)
    seconds = [curves[arm]["seconds"] for arm in ("bf16", "fp8")]
    print(f"\nwall time: bf16 {seconds[0]:.0f} s, fp8 (emulated) {seconds[1]:.0f} s")


if __name__ == "__main__":
    main()
