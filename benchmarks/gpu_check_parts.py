"""The parts of ``benchmarks.gpu_check``, each run in a child process of its own.

Each ``part_<name>(dry, inputs)`` returns its figures (``benchmarks.gpu_check.FIGURES``), or
``{"_skipped": reason}``. ``dry``: on the CPU at tiny sizes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_FLOPS = 989e12  # H100 SXM / H200 dense bf16
DRY_VOCAB = 1024  # a dry run's vocabulary: the ladder's 129K-row head would dominate the CPU step


def _device(dry: bool) -> torch.device:
    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run with --dry on a machine without a GPU")
    return torch.device("cuda")


def part_environment(dry: bool, inputs: dict) -> dict:
    cuda = torch.cuda.is_available() and not dry
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu_memory_gib": (
            round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None
        ),
    }


# ----- the training step: MoE against Engram, kernels, memory -------------------------------


def _step_setup(dry: bool) -> dict:
    if dry:
        flavors = {"moe": "ladder-moe-xs", "engram": "ladder-engram-xs"}
        return dict(flavors=flavors, layers=3, seq=64, batch=2, rows=1009, steps=2, warmup=1,
                    precision="none", backend="sdpa", peak=None)  # fmt: skip
    flavors = {"moe": "moe-27b", "engram": "engram-27b"}
    return dict(flavors=flavors, layers=3, seq=4096, batch=2, rows=200_000, steps=8, warmup=3,
                precision="bf16", backend="flex", peak=PEAK_BF16_FLOPS)  # fmt: skip


def part_step(dry: bool, inputs: dict) -> dict:
    from benchmarks.gpu_step import _args, _batch, profile_step, time_steps
    from models.accounting import account

    s, device = _step_setup(dry), _device(dry)
    out = {"layers": s["layers"], "seq": s["seq"], "batch": s["batch"], "peak_gib": 0.0}
    tokens = s["batch"] * s["seq"]
    for kind, flavor in s["flavors"].items():
        args = _args(flavor, s["layers"], s["rows"], s["backend"])
        args.vocab_size = DRY_VOCAB if dry else args.vocab_size
        batch = _batch(args, s["batch"], s["seq"], 512 if not dry else 32, device)
        seconds, peak, sm, opts = time_steps(
            args, batch, device, s["steps"], s["warmup"], s["precision"]
        )
        out[f"{kind}_step_s"] = seconds
        out[f"{kind}_tokens_per_s"] = tokens / seconds
        flops = account(args, s["seq"]).flops_per_token * tokens / seconds
        out[f"{kind}_mfu"] = flops / s["peak"] if s["peak"] else None
        out["peak_gib"] = max(out["peak_gib"], peak) if peak is not None else None
        if kind == "moe":
            out.update(_gemm_kernels(profile_step(sm, opts, batch, device)))
        del sm, opts, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["engram_vs_moe"] = out["engram_tokens_per_s"] / out["moe_tokens_per_s"]
    return out


def _gemm_kernels(rows: list[tuple[str, float]]) -> dict:
    """The GEMM kernels (or, on the CPU, the matmul ops) of a profiled step, and the
    architecture of the grouped GEMM's kernel (``sm90``/``sm80`` from its name)."""
    gemm = re.compile(r"gemm|grouped|xmma|cutlass|matmul|_mm\b|addmm", re.IGNORECASE)
    kernels = [(name, round(us / 1e3, 3)) for name, us in rows if gemm.search(name)]
    grouped = [name for name, _ in kernels if re.search("grouped", name, re.IGNORECASE)]
    arch = None
    for name in grouped:
        found = re.search(r"sm_?(\d\d)", name)
        arch = f"sm{found.group(1)}" if found else arch
    if arch is None and grouped:
        arch = "cpu" if not torch.cuda.is_available() else "unnamed"
    return {"gemm_kernels": kernels[:8], "grouped_mm_arch": arch}


# ----- FP8 against BF16, both compiled ------------------------------------------------------


def part_fp8(dry: bool, inputs: dict) -> dict:
    """MoE-27B's 3 layers in BF16 and in FP8 rowwise (linears and routed experts), and Engram-27B
    in FP8, every block compiled; a dry run takes the tiny ladder flavors, emulated and eager."""
    import importlib.util

    from benchmarks.gpu_step import _args, _batch, time_steps
    from models.quantize import build_quantize_converter
    from pretrain.config import QuantizeConfig

    if importlib.util.find_spec("torchao") is None:
        return {"_skipped": "torchao is not installed (pip install -e '.[fp8]')"}
    s, device = _step_setup(dry), _device(dry)
    quantize = QuantizeConfig()
    quantize.linear.float8.enable = True
    quantize.grouped_mm.enable = True
    tokens = s["batch"] * s["seq"]
    out = {"recipe": quantize.linear.float8.recipe_name, "compiled": not dry}
    arms = {"moe_bf16": ("moe", False), "moe_fp8": ("moe", True), "engram_fp8": ("engram", True)}
    for arm, (kind, fp8) in arms.items():
        args = _args(s["flavors"][kind], s["layers"], s["rows"], s["backend"])
        args.vocab_size = DRY_VOCAB if dry else args.vocab_size
        batch = _batch(args, s["batch"], s["seq"], 512 if not dry else 32, device)
        convert = build_quantize_converter(quantize).convert if fp8 else None
        start = time.perf_counter()
        seconds, peak, sm, opts = time_steps(
            args, batch, device, s["steps"], s["warmup"], s["precision"],
            convert=convert, compile_blocks=not dry,
        )  # fmt: skip
        out[f"{arm}_warmup_s"] = time.perf_counter() - start - seconds * s["steps"]
        out[f"{arm}_tokens_per_s"] = tokens / seconds
        out[f"{arm}_peak_gib"] = peak
        del sm, opts, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["fp8_vs_bf16"] = out["moe_fp8_tokens_per_s"] / out["moe_bf16_tokens_per_s"]
    out["engram_vs_moe_fp8"] = out["engram_fp8_tokens_per_s"] / out["moe_fp8_tokens_per_s"]
    return out


# ----- the simulator's calibration --------------------------------------------------------------


def part_calibrate(dry: bool, inputs: dict) -> dict:
    if dry:
        return {"_skipped": "dry run: the calibration fits to step times measured on a GPU"}
    step = inputs.get("step") or {}
    if step.get("status") != "ok":
        return {"_skipped": "the step part measured no step times"}
    from benchmarks.calibrate import fit, predict, traces
    from pretrain.simulation.roofline import Calibration

    measured = {"moe-27b": step["moe_step_s"], "engram-27b": step["engram_step_s"]}
    traced = traces("fused")
    cal = fit(traced, measured, Calibration())
    predicted = predict(traced, cal)
    error = max(abs(predicted[f] / measured[f] - 1) for f in measured)
    return {
        "compute_efficiency": cal.compute_efficiency,
        "memory_efficiency": cal.memory_efficiency,
        "measured_step_s": measured,
        "predicted_step_s": predicted,
        "max_relative_error": error,
        # out of sample: the fusion model's step with every block compiled, at the efficiencies
        # just fitted to the eager steps; the fp8 part measures MoE's (``compiled_model_error``)
        "predicted_compiled_step_s": predict(traces("fused", compiled=True), cal),
    }


# ----- tables off the device ----------------------------------------------------------------


def _offload_args(dry: bool):
    from models.flavors import get_flavor

    args = get_flavor("ladder-engram-xs" if dry else "demo")
    rows = 4001 if dry else 250_007  # per head (primes at or above): 4 M rows on the demo model
    args.vocab_size = DRY_VOCAB if dry else args.vocab_size
    args.engram.hash.engram_vocab_size = [rows] * len(args.engram.hash.engram_vocab_size)
    return args


def _offload_arm(args, placement: str, folder: Path, device, batches) -> tuple[list, float, object]:
    """Train ``batches`` (2 warm-up steps, then the timed ones) with the tables at
    ``placement``: ``(losses, seconds per timed step, the first table's rows)``."""
    from benchmarks.gpu_step import _sync
    from models.tables.offload import OffloadedTables, place_engram_tables
    from models.transformer import Transformer
    from parallel.plan import ParallelPlan
    from pretrain.config import OptimizerConfig
    from pretrain.optimizer import Optimizers
    from pretrain.step import StepModel, forward_backward, optimizer_step

    with torch.device("meta"):
        model = Transformer(args)
    if placement != "device":
        place_engram_tables(model, placement, "25%", device, folder / placement)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    sm = StepModel(model, model, ParallelPlan())
    opts = Optimizers(model, OptimizerConfig(lr=1e-2, engram_lr_multiplier=5.0))
    tables = OffloadedTables(model)
    losses, start = [], 0.0
    for i, batch in enumerate(batches):
        if i == 2:
            _sync(device)
            start = time.perf_counter()
        if tables and i + 1 < len(batches):
            tables.prefetch(batches[i + 1])
        out = forward_backward(sm, batch.to(device))
        optimizer_step(sm, opts, 1.0)
        losses.append(out.ce)
    for table in tables.tables.values() if tables else ():
        table.cache.wait()
        table.store.drain()
    _sync(device)
    seconds = (time.perf_counter() - start) / (len(batches) - 2)
    first = model.engram_layers()[0].table
    if hasattr(first, "store"):
        first.cache.flush()
        rows = first.store.field("weight").clone()
    else:
        rows = first.weight.detach().cpu().clone()
    return [float(x) for x in losses], seconds, rows


def part_offload(dry: bool, inputs: dict) -> dict:
    from benchmarks.gpu_step import _batch
    from data.batch import plan_lookups
    from models.transformer import Transformer
    from pretrain.step import lookup_planners

    device, args = _device(dry), _offload_args(dry)
    batch, seq, steps = (2, 64, 6) if dry else (8, 512, 12)
    with torch.device("meta"):
        planners = lookup_planners(Transformer(args))
    batches = []
    for step in range(steps):
        torch.manual_seed(step)
        batches.append(plan_lookups(_batch(args, batch, seq, 64, "cpu"), planners, 1))
    out, results = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for placement in ("device", "host", "disk"):
            results[placement] = _offload_arm(args, placement, Path(scratch), device, batches)
            out[f"{placement}_step_s"] = results[placement][1]
    out["table_rows"] = sum(sum(s) for s in args.engram.table_sizes().values())
    out["host_vs_device"] = out["host_step_s"] / out["device_step_s"]
    out["disk_vs_device"] = out["disk_step_s"] / out["device_step_s"]
    want_losses, _, want_rows = results["device"]
    out["bit_identical"] = all(
        losses == want_losses and torch.equal(rows, want_rows)
        for losses, _, rows in (results["host"], results["disk"])
    )
    return out


# ----- host synchronisations ------------------------------------------------------------------


def part_host_syncs(dry: bool, inputs: dict) -> dict:
    from benchmarks.gpu_step import _batch, build_step
    from data.batch import plan_lookups
    from models.flavors import get_flavor
    from pretrain.step import forward_backward, lookup_planners, optimizer_step
    from tests.host_sync import HostSyncCounter

    device = _device(dry)
    args = get_flavor("ladder-engram-xs" if dry else "demo")
    args.vocab_size = DRY_VOCAB if dry else args.vocab_size
    sm, opts = build_step(args, device, "none" if dry else "bf16")
    planners = lookup_planners(sm.inner)
    batches = [
        plan_lookups(_batch(args, 2, 64 if dry else 512, 32, "cpu"), planners, 1).to(device)
        for _ in range(2)
    ]
    forward_backward(sm, batches[0])  # warm-up: lazy state, compiled kernels
    optimizer_step(sm, opts, 1.0)
    with HostSyncCounter() as forward:
        forward_backward(sm, batches[1])
    with HostSyncCounter() as update:  # on the CPU, AdamW reads its step counters (item)
        optimizer_step(sm, opts, 1.0)
    return {
        "syncs_per_step": forward.total + update.total,
        "forward_backward": forward.total,
        "optimizer_step": update.total,
        "by_op": dict(forward.counts + update.counts),
    }


# ----- pytest -m gpu ----------------------------------------------------------------------------


def part_gpu_tests(dry: bool, inputs: dict) -> dict:
    """``pytest -m gpu`` on the files that hold gpu-marked tests; results read from its verbose
    lines, so that a run cut short still reports what finished."""
    files = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").rglob("test_*.py")
        if "mark.gpu" in p.read_text()
    )
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", *files]
    limit = 30 if dry else 140
    try:
        output = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=limit
        ).stdout
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    outcomes = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", output, re.M)
    failures = [name for name, outcome in outcomes if outcome in ("FAILED", "ERROR")]
    return {
        "passed": sum(o == "PASSED" for _, o in outcomes),
        "failed": len(failures),
        "skipped": sum(o == "SKIPPED" for _, o in outcomes),
        "failures": failures,
    }


PARTS = {
    "environment": part_environment,
    "step": part_step,
    "calibrate": part_calibrate,
    "offload": part_offload,
    "host_syncs": part_host_syncs,
    "fp8": part_fp8,
    "gpu_tests": part_gpu_tests,
}


def run_one(name: str, dry: bool, inputs: Path, result: Path) -> int:
    """A child process: run part ``name`` and write its figures to ``result``."""
    if dry:
        torch.set_num_threads(1)
    figures = PARTS[name](dry, json.loads(inputs.read_text()) if inputs else {})
    result.write_text(json.dumps(figures, default=str))
    return 0
