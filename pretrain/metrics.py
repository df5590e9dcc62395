"""Console, progress bar, TensorBoard and ``metrics.jsonl`` logging.

Console line: ``step: N  loss: X  grad_norm: Y  lr: L  memory: Z GiB  tps: T  tflops: F  mfu: M%
data_wait: W%  eta: 4m05s`` (eta while steps remain). TensorBoard tags follow torchtitan
(``loss_metrics/global_avg_loss``, ``throughput(tps)``, ``mfu(%)``,
``time_metrics/data_loading(%)``, ``memory/max_active(GiB)``), plus ``engram/gate_mean/layer{L}``
and ``engram/unique_rows_frac``.
MFU = 100 * flops_per_token * tokens_per_second / peak_flops, with ``tps`` the tokens per second
per device (the step's tokens over the world size, as torchtitan), so MFU is per GPU.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from pretrain.config import MetricsConfig

# Peak dense TFLOP/s used for MFU when metrics.peak_tflops = 0.
PEAK_TFLOPS = {"H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}
CPU_PEAK_TFLOPS_PER_CORE = 0.1  # fp32 AVX2 FMA at ~3 GHz: 2 x 8 x 2 x 3e9


def default_peak_tflops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
        return 312.0
    return CPU_PEAK_TFLOPS_PER_CORE * torch.get_num_threads()


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Rank 0 writes; other ranks only keep the progress bar off.

    It owns the timing window: ``step_done(tokens, data_wait)`` after every step, ``should_log``
    says when to log, and ``log_train`` turns the window into tokens/s, MFU and the data-wait
    share, then opens a new window.
    """

    def __init__(
        self,
        cfg: MetricsConfig,
        run_folder: Path,
        rank: int,
        total_steps: int,
        start_step: int,
        device: torch.device,
        flops_per_token: float = 0.0,
    ):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.total_steps, self.flops_per_token = total_steps, flops_per_token
        self._window_start, self._window_tokens, self._window_wait = time.perf_counter(), 0, 0.0
        self._run_start, self._start_step = time.perf_counter(), start_step
        self.enabled = rank == 0
        self.peak_flops = (cfg.peak_tflops or default_peak_tflops(device)) * 1e12
        self.jsonl = run_folder / "metrics.jsonl"
        self.bar = self.tb = None
        if not self.enabled:
            return
        _truncate_after(self.jsonl, start_step)
        if cfg.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_folder / cfg.save_tb_folder), purge_step=start_step + 1)
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                disable=None,
            )

    def step_done(self, tokens: int, data_wait_seconds: float) -> None:
        """Count one finished step (its tokens per device, its data wait)."""
        self._window_tokens += tokens
        self._window_wait += data_wait_seconds
        if self.bar is not None:
            self.bar.update(1)

    def should_log(self, step: int) -> bool:
        return step % self.cfg.log_freq == 0 or step == self.total_steps

    def _close_window(self) -> tuple[float, float]:
        """(tokens/s, data-wait %) of the window, then a new window starts."""
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        tps, wait = self._window_tokens / elapsed, 100 * self._window_wait / elapsed
        self._window_start, self._window_tokens, self._window_wait = time.perf_counter(), 0, 0.0
        return tps, wait

    def eta_seconds(self, step: int) -> float | None:
        """Time to ``total_steps`` at this run's mean step time so far (None when done)."""
        done, left = step - self._start_step, self.total_steps - step
        if done <= 0 or left <= 0:
            return None
        return (time.perf_counter() - self._run_start) / done * left

    def log_train(self, step: int, values: dict, engram: dict[str, float]) -> None:
        """``values``: loss, grad_norm, lr and optional aux losses of the step just done."""
        tps, data_wait = self._close_window()
        if not self.enabled:
            return
        values = {**values, "tps": tps, "data_wait_pct": data_wait}
        tflops = self.flops_per_token * tps / 1e12
        mfu = 100 * self.flops_per_token * tps / self.peak_flops
        mem = memory_gib(self.device)
        line = (
            f"step: {step}  loss: {values['loss']:.4f}  grad_norm: {values['grad_norm']:.3f}  "
            f"lr: {values['lr']:.2e}  memory: {mem:.2f} GiB  tps: {tps:,.0f}  "
            f"tflops: {tflops:.3f}  mfu: {mfu:.2f}%  data_wait: {values['data_wait_pct']:.1f}%"
        )
        eta = self.eta_seconds(step)
        if eta is not None:
            line += f"  eta: {format_duration(eta)}"
        for name, value in values.get("aux", {}).items():
            line += f"  {name}: {value:.4f}"
        self._print(line)
        scalars = {
            "loss_metrics/global_avg_loss": values["loss"],
            "grad_norm": values["grad_norm"],
            "lr": values["lr"],
            "throughput(tps)": tps,
            "tflops": tflops,
            "mfu(%)": mfu,
            "time_metrics/data_loading(%)": values["data_wait_pct"],
            "memory/max_active(GiB)": mem,
            **{f"loss_metrics/{k}": v for k, v in values.get("aux", {}).items()},
            **engram,
        }
        self._write(
            step,
            scalars,
            {
                "step": step,
                "loss": values["loss"],
                "grad_norm": values["grad_norm"],
                "lr": values["lr"],
                "tps": tps,
                "mfu": mfu,
                "data_wait_pct": values["data_wait_pct"],
                **engram,
            },
        )

    def log_eval(
        self, step: int, loss: float, tokens: int, per_source: dict[str, float] | None = None
    ) -> None:
        """``per_source``: a mixture's ``val_loss/<name>`` of each source with held-out data."""
        if not self.enabled:
            return
        named = {f"val_loss/{name}": value for name, value in (per_source or {}).items()}
        line = (
            f"eval step: {step}  val_loss: {loss:.4f}  val_ppl: {_ppl(loss):.2f}  tokens: {tokens}"
        )
        line += "".join(f"  {tag}: {value:.4f}" for tag, value in named.items())
        self._print(line)
        self._write(
            step,
            {"loss_metrics/val_loss": loss, **named},
            {"step": step, "val_loss": loss, "val_tokens": tokens, **named},
        )

    def log_downstream(self, step: int, scalars: dict[str, float]) -> None:
        """``eval/<task>/<metric>`` and ``eval/downstream_s`` (pretrain.downstream): a console
        line per task with its headline metrics, TensorBoard scalars and one jsonl record."""
        if not self.enabled:
            return
        tasks: dict[str, list[str]] = {}
        for task, metric, value in headline(scalars):
            tasks.setdefault(task, []).append(f"{metric}: {value:.4f}")
        for task, shown in tasks.items():
            self._print(f"downstream step: {step}  {task}  " + "  ".join(shown))
        self._print(f"downstream step: {step}  took {scalars.get('eval/downstream_s', 0):.1f} s")
        self._write(step, scalars, {"step": step, **scalars})

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def _write(self, step: int, scalars: dict, record: dict) -> None:
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


# the metrics a downstream task's console line shows (all of them go to jsonl and TensorBoard)
HEADLINE = ("acc_v2", "len_norm_v2", "bpb_v2", "ce_loss_v2", "f1_v2")


def headline(scalars: dict[str, float]) -> list[tuple[str, str, float]]:
    """``(task, metric, value)`` of the headline metrics among ``eval/<task>/<metric>``."""
    out = []
    for tag, value in scalars.items():
        parts = tag.split("/")
        if len(parts) == 3 and parts[2] in HEADLINE:
            out.append((parts[1], parts[2], value))
    return out


def format_duration(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``12s``."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _ppl(loss: float) -> float:
    import math

    return math.exp(min(loss, 50))


def _truncate_after(path: Path, step: int) -> None:
    """On resume, move records of steps after the checkpoint to ``metrics.abandoned.jsonl``."""
    if not path.is_file():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            (keep if json.loads(line)["step"] <= step else drop).append(line)
    if drop:
        with open(path.with_name("metrics.abandoned.jsonl"), "a") as handle:
            handle.write("\n".join(drop) + "\n")
        path.write_text("".join(line + "\n" for line in keep))
