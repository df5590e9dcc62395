"""The statistics of ``launch.experiments``: paired bootstrap intervals over seeds x validation
windows (or downstream questions), verdicts, each arm against the first, and the log-linear fit
of loss on table rows.

Pure numpy and the standard library: readable and testable without training anything.
"""

from __future__ import annotations

import math
import statistics

import numpy as np


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


def verdict(interval: tuple[float, float], higher_is_better: bool = False) -> str:
    """``a - b`` wholly on A's better side of 0 -> "A better", wholly on B's -> "B better"
    (lower is better for losses and bits per byte, higher for accuracies)."""
    low, high = (-interval[1], -interval[0]) if higher_is_better else interval
    return "A better" if high < 0 else "B better" if low > 0 else "undecided"


# downstream metrics (olmo-eval's names) where a larger value is better
HIGHER_IS_BETTER = ("acc", "len_norm", "soft", "f1", "pmi_dc")


def comparisons(rows: list[dict]) -> list[dict]:
    """Every arm against the first (the MoE arm, rho = 1, or the smallest table), where both
    have the same seeds and cells: the validation loss over seeds x validation windows
    (``metric`` "val_loss"), and each downstream metric over seeds x questions (``metric``
    "<task>/<metric>")."""
    out = []
    first = rows[0] if rows else None
    for row in rows[1:]:
        pairs = [("val_loss", row.get("val_windows") or [], first.get("val_windows") or [])]
        theirs = first.get("downstream") or {}
        for key, values in sorted((row.get("downstream") or {}).items()):
            pairs.append((key, values, theirs.get(key) or []))
        for metric, a, b in pairs:
            if not a or not b or np.shape(a) != np.shape(b) or not np.size(a):
                continue
            diff, interval = paired_bootstrap(a, b)
            higher = metric.split("/")[-1].startswith(HIGHER_IS_BETTER)
            out.append(
                {
                    "metric": metric,
                    "a": row["name"],
                    "b": first["name"],
                    "diff_mean": diff,
                    "ci95": list(interval),
                    "verdict": verdict(interval, higher),
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


def arm_interval(row: dict) -> tuple[float, tuple[float, float]]:
    """An arm's mean validation loss over seeds x windows and its 95 % bootstrap interval."""
    windows = row.get("val_windows") or [[v] for v in row["val_loss"]]
    return paired_bootstrap(windows, np.zeros_like(np.asarray(windows, dtype=np.float64)))
