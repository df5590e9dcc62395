"""Fit the simulator's roofline constants to measured GPU steps: ``benchmarks/calibration.json``.

The measurements are ``benchmarks/gpu_step.py``'s (one GPU, paper widths cut to 3 layers, 2 x 4096
tokens, bf16, flex attention): MoE-27B and Engram-27B step times. The same set-ups are traced on
fake tensors (``launch.dry_run`` with ``gpu_step_overrides``), running the Engram tail that was
measured (the stored H100 numbers predate the fused tail), and the attained compute and memory
efficiencies are the pair (on a grid) whose predicted step times are closest to the measured ones,
in relative error. With a GPU, ``--measure`` runs ``gpu_step`` first and fits to what it measures.

Two constants fitted to two step times reproduce them by construction; what the fit shows is
whether plausible efficiencies can (they can: about 0.6 of peak FLOPs and of HBM bandwidth), and
the test that keeps the agreement guards the trace (an op that stops being counted, a change in
what Engram moves) rather than validating the model. More measured set-ups (6 layers, other
batch sizes) are what would validate it.

Run: .venv/bin/python -m benchmarks.calibrate [--measure] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
from unittest import mock

import numpy as np

from pretrain.simulation.roofline import Calibration

CONFIGS = {"moe-27b": "launch/configs/moe_27b.toml", "engram-27b": "launch/configs/engram_27b.toml"}

# the stored measurement: docs/benchmarks.md, "One GPU: paper-width models"
MEASURED = {
    "device": "NVIDIA H100 80GB HBM3",
    "torch": "2.11.0+cu130",
    "date": "2026-11-22",
    "step_s": {"moe-27b": 0.238, "engram-27b": 0.287},
    "setup": "benchmarks.gpu_step --layers 3 --seq 4096 --batch 2 (flex attention, bf16)",
    # measured before models/engram_fused.py: the traces it is fitted to run the composite tail
    "engram_tail": "composite",
}


@contextlib.contextmanager
def engram_tail(kind: str):
    """Trace Engram layers with their ``fused`` tail or the ``composite`` one (what a stored
    measurement ran)."""
    from models.engram import Engram

    original = Engram.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.fused = kind == "fused"

    with mock.patch.object(Engram, "__init__", init):
        yield


def gpu_step_overrides(flavor: str, compiled: bool = False) -> list[str]:
    """``launch.dry_run`` overrides that trace ``gpu_step``'s set-up on one rank (it measured
    eager blocks; ``compiled``: each block compiled, as gpu_check's ``fp8`` part runs)."""
    out = [
        "--parallelism.data_parallel_shard_degree=1",
        "--parallelism.expert_parallel_degree=1",
        "--parallelism.engram_shard_degree=1",
        "--training.batch_size=2",
        "--data.seq_len=4096",
        "--training.grad_accum_steps=1",
        "--training.mixed_precision=bf16",
        "--activation_checkpoint.mode=none",
        "--model.overrides.num_layers=3",
        f"--compile.enable={str(compiled).lower()}",
    ]
    if flavor.startswith("engram"):
        out += [
            "--model.overrides.engram.hash.layer_ids=[1, 2]",
            "--model.overrides.engram.hash.engram_vocab_size=[200000, 200000]",
        ]
    return out


def traces(tail: str = "fused", compiled: bool = False) -> dict:
    """Per flavor: (trace, dims, flops per token) of the gpu_step set-up, Engram's tail
    ``tail``; ``compiled``: every block compiled (the simulator's fusion model), as gpu_check's
    ``fp8`` part runs its BF16 arm."""
    from models.accounting import account
    from models.flavors import resolve_model_args
    from parallel.dims import ParallelDims
    from pretrain.config import load_config
    from pretrain.simulation.simulate import trace_step

    out = {}
    for flavor, config in CONFIGS.items():
        cfg = load_config(config, gpu_step_overrides(flavor, compiled))
        args = resolve_model_args(cfg.model.flavor, cfg.model.overrides, seq_len=cfg.data.seq_len)
        dims = ParallelDims.from_config(cfg.parallelism, 1)
        flops = account(args, cfg.data.seq_len).flops_per_token
        with engram_tail(tail):
            out[flavor] = (trace_step(cfg, 1, 0), dims, flops)
    return out


def predict(traced: dict, cal: Calibration) -> dict[str, float]:
    from pretrain.simulation.cost_model import Hardware, estimate_trace

    return {
        flavor: estimate_trace(trace, dims, 1, flops, Hardware(), cal)["est_step_s"]
        for flavor, (trace, dims, flops) in traced.items()
    }


def fit(traced: dict, measured: dict[str, float], base: Calibration) -> Calibration:
    """The grid point of (compute, memory) efficiency with the least squared relative error
    (one GPU: no collectives, so a step is the sum of its kernels' roofline times)."""
    from pretrain.simulation.cost_model import table_optimizer_record
    from pretrain.simulation.roofline import roofline_seconds

    arrays = {}
    for flavor, (trace, _, _) in traced.items():
        ops = [*trace.ops]
        if trace.sparse_grad_bytes_per_microbatch:
            ops.append(table_optimizer_record(trace.sparse_grad_bytes_per_microbatch, 1))
        arrays[flavor] = (
            np.array([o.flops for o in ops]),
            np.array([o.bytes for o in ops]),
            np.array([o.expert for o in ops]),
        )
    best, best_err = base, float("inf")
    grid = np.round(np.arange(0.20, 0.96, 0.01), 2)
    for compute, memory in itertools.product(grid, grid):
        cal = Calibration(
            **{**base.__dict__, "compute_efficiency": compute, "memory_efficiency": memory}
        )
        err = 0.0
        for flavor, (flops, nbytes, expert) in arrays.items():
            step = float(roofline_seconds(flops, nbytes, expert, cal).sum())
            err += (step / measured[flavor] - 1) ** 2
        if err < best_err:
            best, best_err = cal, err
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", action="store_true", help="run gpu_step first (CUDA)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/calibration.json")
    ns = parser.parse_args()
    measured = dict(MEASURED)
    if ns.measure:
        measured = _measure()
    traced = traces(measured["engram_tail"])
    cal = fit(traced, measured["step_s"], Calibration())
    cal.device, cal.torch, cal.date = measured["device"], measured["torch"], measured["date"]
    cal.fitted_to = {
        "step_s": measured["step_s"],
        "setup": measured["setup"],
        "engram_tail": measured["engram_tail"],
        "fitted_on": datetime.date.today().isoformat(),
    }
    got = predict(traced, cal)
    for flavor, seconds in measured["step_s"].items():
        print(f"{flavor}: measured {seconds:.3f} s, predicted {got[flavor]:.3f} s")
    ratio = measured["step_s"]["moe-27b"] / measured["step_s"]["engram-27b"]
    predicted = got["moe-27b"] / got["engram-27b"]
    print(f"engram/moe tokens/s: measured {ratio:.3f}, predicted {predicted:.3f}")
    print(
        f"compute_efficiency {cal.compute_efficiency}, memory_efficiency "
        f"{cal.memory_efficiency}, launch_us {cal.launch_us}"
    )
    if measured["engram_tail"] != "fused":
        fused = predict(traces("fused"), cal)
        print(f"engram-27b with the fused tail: predicted {fused['engram-27b']:.3f} s per step")
    compiled = predict(traces("fused", compiled=True), cal)
    print(
        "compiled blocks (fused tail), predicted: "
        + ", ".join(f"{flavor} {seconds:.3f} s" for flavor, seconds in compiled.items())
    )
    if ns.write:
        cal.save()
        print("wrote benchmarks/calibration.json")


def _measure() -> dict:
    """Run ``gpu_step`` (flex attention) on this GPU: the step times to fit to."""
    import torch

    from benchmarks.gpu_step import measure

    args = argparse.Namespace(
        layers=3,
        seq=4096,
        batch=2,
        doc_len=512,
        rows=200_000,
        steps=8,
        warmup=3,
        peak_tflops=989.0,
        profile=0,
    )
    steps = {flavor: measure(flavor, "flex", args)[2] for flavor in CONFIGS}
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "step_s": steps,
        "setup": MEASURED["setup"],
        "engram_tail": "fused",
    }


if __name__ == "__main__":
    main()
