"""What ``launch.experiments`` writes after its runs: ``results.json`` rows with the accounting
and the paired comparisons, the PNG plot and ``report.md``."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from launch.experiment_stats import arm_interval, comparisons, fit_log_linear, summary_stats
from models.derive import Arm


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
            # {"<task>/<metric>": [per seed: [value of each question]]} (runs that scored all)
            downstream=_downstream(runs),
        )
        rows.append(row)
    out["arms"] = rows
    out["comparisons"] = comparisons(rows)
    return out


def _downstream(runs: list[dict]) -> dict[str, list[list[float]]]:
    keys = set.intersection(*(set(r.get("downstream") or {}) for r in runs)) if runs else set()
    return {key: [r["downstream"][key] for r in runs] for key in sorted(keys)}


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
            "Each arm against the first: the mean difference (a minus b) of each metric over "
            "seeds x validation windows (val_loss) or seeds x questions (downstream), with its "
            "95 % paired bootstrap interval:",
            "",
            "| metric | a | b | a - b | 95 % interval | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for c in res["comparisons"]:
            low, high = c["ci95"]
            lines.append(
                f"| {c.get('metric', 'val_loss')} | {c['a']} | {c['b']} | {c['diff_mean']:+.4f} "
                f"| [{low:+.4f}, {high:+.4f}] | {c['verdict']} |"
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
