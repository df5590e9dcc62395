"""Everything the CPU cannot measure, in one command on one GPU: ``bash scripts/gpu_check.sh``.

Parts, each a child process with its own time limit, so that one slow or hung part cannot eat the
others (a part that cannot run says why; the run still ends with its JSON):

- ``environment``: the device, torch and CUDA versions, the GPU's memory;
- ``step``: ``benchmarks.gpu_step`` at 3 layers of the 27B widths in bf16 (flex attention):
  Engram and MoE tokens/s, their ratio, MFU, peak memory, and the GEMM kernels the profiler saw
  (which grouped-GEMM kernel ``torch._grouped_mm`` ran: sm90 or sm80);
- ``calibrate``: the simulator's efficiencies fitted to the step part's measured step times
  (``benchmarks.calibrate``), and the simulator's error against them; also its step with every
  block compiled, which the ``fp8`` part's compiled BF16 arm measures (``compiled_model_error``
  in the JSON); it traces on fake tensors (CPU only) while the GPU parts after it run;
- ``offload``: the same steps with the Engram tables on the device, in host memory and on disk:
  step times, their ratios, and whether the three train bit-identically;
- ``host_syncs``: host synchronisations in one training step, counted by the project's counter
  (``tests.host_sync.HostSyncCounter``) on the device;
- ``fp8``: the step part's 3 layers, every block compiled: MoE in BF16 and in FP8 rowwise
  (``[quantize]``: linears and routed experts), Engram in FP8; tokens/s, FP8 / BF16, Engram / MoE
  in FP8, each arm's compile warm-up and peak memory;
- ``gpu_tests``: ``pytest -m gpu``: passed, failed, skipped, the failures' names.

It prints a table, then one JSON line (also written to ``$OUT/gpu_check.json`` when ``OUT`` is
set, else ``outputs/gpu_check.json``) with the same keys in every mode. ``--dry`` runs the same
parts on the CPU at tiny sizes (or skips one, with the reason) in under a minute: the default
test suite runs it. Exit status 0 unless the check itself broke (a part that fails or times out
is reported, not fatal); ``--strict`` exits 1 when a part failed or timed out.

Run: bash scripts/gpu_check.sh [--dry] [--parts step,offload] [--strict]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# part -> (time limit in seconds on a GPU, in a dry run): about 5 minutes in all on an H100,
# the calibration's CPU tracing overlapping the GPU parts that follow it
LIMITS = {
    "environment": (30, 20),
    "step": (90, 30),
    "calibrate": (120, 20),
    "offload": (60, 30),
    "host_syncs": (45, 30),
    "fp8": (150, 40),
    "gpu_tests": (150, 40),
}
ORDER = ["environment", "step", "calibrate", "offload", "host_syncs", "fp8", "gpu_tests"]
# the figures of each part: always present, None where not measured
FIGURES = {
    "environment": ["device", "torch", "cuda", "gpu_memory_gib"],
    "step": [
        "layers",
        "seq",
        "batch",
        "moe_step_s",
        "engram_step_s",
        "moe_tokens_per_s",
        "engram_tokens_per_s",
        "engram_vs_moe",
        "moe_mfu",
        "engram_mfu",
        "peak_gib",
        "gemm_kernels",
        "grouped_mm_arch",
    ],
    "calibrate": [
        "compute_efficiency",
        "memory_efficiency",
        "measured_step_s",
        "predicted_step_s",
        "max_relative_error",
        "predicted_compiled_step_s",
    ],
    "offload": [
        "table_rows",
        "device_step_s",
        "host_step_s",
        "disk_step_s",
        "host_vs_device",
        "disk_vs_device",
        "bit_identical",
    ],
    "host_syncs": ["syncs_per_step", "forward_backward", "optimizer_step", "by_op"],
    "fp8": [
        "recipe",
        "compiled",
        *(
            f"{arm}_{figure}"
            for arm in ("moe_bf16", "moe_fp8", "engram_fp8")
            for figure in ("tokens_per_s", "warmup_s", "peak_gib")
        ),
        "fp8_vs_bf16",
        "engram_vs_moe_fp8",
    ],
    "gpu_tests": ["passed", "failed", "skipped", "failures"],
}


# ----- running the parts --------------------------------------------------------------------


def run_part(name: str, argv: list[str], limit: float, env: dict | None = None) -> dict:
    """Run one part's child process under ``limit`` seconds; its figures come back through a
    result file. Returns ``{"status": ok | failed | timed_out, "seconds", "reason"?, ...}``."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        started = time.perf_counter()
        proc = subprocess.Popen(
            [*argv, "--result", str(result)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a timed-out part is killed with its children
        )
        try:
            output, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            output, _ = proc.communicate()
            return _outcome(name, "timed_out", started, f"over its {limit:g} s limit", output)
        if proc.returncode != 0 or not result.is_file():
            return _outcome(name, "failed", started, f"exit {proc.returncode}", output)
        figures = json.loads(result.read_text())
        reason = figures.pop("_skipped", None)
        outcome = _outcome(name, "skipped" if reason else "ok", started, reason, output)
        outcome.update({k: v for k, v in figures.items() if k in outcome})
        return outcome


def _outcome(name: str, status: str, started: float, reason: str | None, output: str) -> dict:
    out = {"status": status, "seconds": round(time.perf_counter() - started, 1)}
    out.update(dict.fromkeys(FIGURES.get(name, []), None))
    if reason:
        out["reason"] = reason
    if status in ("failed", "timed_out"):
        out["output_tail"] = (output or "")[-1500:]
    return out


def part_argv(name: str, dry: bool, inputs: Path) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.gpu_check", "--part", name, "--inputs", str(inputs)]
    return argv + (["--dry"] if dry else [])


def run_all(parts: list[str], dry: bool, limits: dict[str, float]) -> dict[str, dict]:
    """Every part in ``ORDER``; the calibration (CPU tracing) runs beside the parts after it."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        inputs = Path(scratch) / "inputs.json"
        inputs.write_text("{}")
        background = None
        for name in [p for p in ORDER if p in parts]:
            if name == "calibrate":
                inputs.write_text(json.dumps({"step": results.get("step", {})}))
                background = _Background(name, part_argv(name, dry, inputs), limits[name])
                continue
            results[name] = run_part(name, part_argv(name, dry, inputs), limits[name])
            print(f"{name}: {results[name]['status']} ({results[name]['seconds']} s)", flush=True)
        if background is not None:
            results["calibrate"] = background.join()
            print(f"calibrate: {results['calibrate']['status']}", flush=True)
    return {name: results[name] for name in ORDER if name in results}


class _Background:
    """``run_part`` in a thread, so that the CPU-only calibration overlaps the GPU parts."""

    def __init__(self, name: str, argv: list[str], limit: float):
        import threading

        self.result: dict = {}
        self.thread = threading.Thread(
            target=lambda: self.result.update(run_part(name, argv, limit)), daemon=True
        )
        self.thread.start()

    def join(self) -> dict:
        self.thread.join()
        return self.result


# ----- the report ---------------------------------------------------------------------------


def summary(results: dict[str, dict], dry: bool, seconds: float) -> dict:
    env = results.get("environment", {})
    return {
        "dry": dry,
        "device": env.get("device"),
        "torch": env.get("torch"),
        "cuda": env.get("cuda"),
        "seconds": round(seconds, 1),
        "compiled_model_error": compiled_model_error(results),
        "parts": results,
    }


def compiled_model_error(results: dict[str, dict]) -> float | None:
    """The simulator's compiled-block step of MoE (``calibrate``: efficiencies fitted to the
    eager steps) over the one the ``fp8`` part measured for its compiled BF16 arm, minus 1: how
    well the fusion model (``pretrain.simulation.fusion``) predicts a step it was not fitted
    to. None where either part did not run."""
    step, fp8 = results.get("step", {}), results.get("fp8", {})
    predicted = (results.get("calibrate", {}).get("predicted_compiled_step_s") or {}).get("moe-27b")
    tokens_per_s = fp8.get("moe_bf16_tokens_per_s")
    if not (predicted and tokens_per_s and step.get("seq") and step.get("batch")):
        return None
    measured = step["batch"] * step["seq"] / tokens_per_s
    return predicted / measured - 1


def write_report(report: dict) -> Path:
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "outputs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def print_table(results: dict[str, dict]) -> None:
    for name, part in results.items():
        figures = {k: v for k, v in part.items() if k in FIGURES.get(name, []) and v is not None}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in figures.items())
        why = f" [{part['reason']}]" if part.get("reason") else ""
        print(f"{name:12s} {part['status']:9s} {part['seconds']:6.1f} s  {shown}{why}")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    parser.add_argument("--dry", action="store_true", help="on the CPU at tiny sizes")
    parser.add_argument("--parts", default=",".join(ORDER), help="a comma-separated subset")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a part did not pass")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # a child process: one part
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.part:
        from benchmarks.gpu_check_parts import run_one

        return run_one(ns.part, ns.dry, Path(ns.inputs), Path(ns.result))
    parts = [p for p in ns.parts.split(",") if p]
    unknown = sorted(set(parts) - set(ORDER))
    if unknown:
        parser.error(f"unknown part(s) {unknown}: choose from {', '.join(ORDER)}")
    limits = {name: LIMITS[name][1 if ns.dry else 0] for name in ORDER}
    started = time.perf_counter()
    results = run_all(parts, ns.dry, limits)
    report = summary(results, ns.dry, time.perf_counter() - started)
    print_table(results)
    path = write_report(report)
    print(f"wrote {path}")
    print(json.dumps(report))
    bad = [n for n, p in results.items() if p["status"] in ("failed", "timed_out")]
    return 1 if ns.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
