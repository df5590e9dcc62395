"""Small helpers shared by the benchmarks: timing and table printing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench_overrides(dump) -> list[str]:
    """Trainer overrides of a benchmark: no checkpoints, logs, progress bar or downstream scoring,
    unlimited steps."""
    return [
        f"--job.dump_folder={dump}",
        "--checkpoint.enable=false",
        "--metrics.enable_tensorboard=false",
        "--metrics.progress_bar=false",
        "--training.steps=100000",
        "--metrics.log_freq=100000",
        "--downstream.tasks=",  # the demo config's benchmark scoring is not what is timed
        "--downstream.interval=0",
    ]


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
