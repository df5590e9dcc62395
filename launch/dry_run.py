"""``python -m launch.dry_run --config FILE [--world_size N] [--rank R] [--gpu_memory_gib 80]``

A simulator of one training step at the target layout, on a laptop. It builds the job's flavor on
the meta device under a fake process group at the target world size and applies the full
parallel plan for one rank: parameters per rank, FLOPs per token and the analytical memory
estimate (``models.memory``, ``peak_gib``). Then (unless ``--analytical``) it runs a real step on
fake tensors (``pretrain.simulation.simulate``): the traced peak memory (``peak_gib_traced``),
the communication per collective and mesh axis (``comm_gib_per_step``), and the step time,
tokens/s and MFU from every traced kernel's roofline time (``pretrain.simulation.roofline``,
constants fitted to measured GPU steps in ``benchmarks/calibration.json``) and the links
(``pretrain.simulation.cost_model``; ``--nvlink_gbps``... override them); ``est_engram_s`` is
Engram's own share. The last line is a JSON summary; the exit code is 1 when
the layout does not fit in 90 % of ``--gpu_memory_gib`` (by the traced peak when there is one).
A 27B recipe takes about a minute per traced rank.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist

from models.accounting import account
from models.memory import RankCounts, estimate_memory
from parallel.dims import ParallelDims
from pretrain.config import load_config
from pretrain.simulation.comm import GIB, comm_summary
from pretrain.simulation.cost_model import Hardware, estimate_trace
from pretrain.simulation.roofline import Calibration
from pretrain.simulation.simulate import job_layout, rank_model, trace_step


def rank_counts(model: torch.nn.Module, fsdp: bool) -> RankCounts:
    dense = tables = rows = 0
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if name.endswith("table.weight"):
            tables += local.numel()
            rows += local.shape[0]
        else:
            dense += local.numel()
    largest = 0
    if fsdp:
        for block in model.layers.values():
            total = sum(
                p.numel() for n, p in block.named_parameters() if hasattr(p, "to_local")
            )  # FSDP-managed: gathered whole for compute
            largest = max(largest, total)
    return RankCounts(dense, tables, rows, largest)


def dry_run(
    config_path: str,
    overrides: list[str],
    world_size: int,
    rank: int,
    gpu_memory_gib: float,
    simulate: bool = False,
    hardware: Hardware | None = None,
    calibration: Calibration | None = None,
) -> dict:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg = load_config(config_path, overrides)
    args, dims = job_layout(cfg, world_size)  # errors before any group work
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        ac = cfg.activation_checkpoint.mode == "full"
        _, (_, inner, _) = rank_model(cfg, args, dims, dry_run=True)
        counts = rank_counts(inner, fsdp=dims.dp_shard * dims.cp > 1)
    finally:
        dist.destroy_process_group()
    tokens = cfg.training.batch_size * cfg.data.seq_len // dims.cp  # this rank's chunks
    memory = estimate_memory(
        args, counts, tokens, dims.batch_degree, dims.engram_shard > 1, ac, dims.cp
    )
    accounting = account(args, cfg.data.seq_len)
    result = {
        "flavor": cfg.model.flavor,
        "world_size": world_size,
        "rank": rank,
        "layout": dims.layout(),
        "total_params": accounting.total_params,
        "activated_params": accounting.activated_params,
        "flops_per_token": accounting.flops_per_token,
        "rank_dense_params": counts.dense_params,
        "rank_table_params": counts.table_params,
        "memory_gib": memory.as_dict(),
        "gpu_memory_gib": gpu_memory_gib,
        "peak_gib": round(memory.peak_gib, 2),
        "fits": memory.peak_gib <= 0.9 * gpu_memory_gib,
    }
    if simulate:
        est = simulated(
            cfg, dims, world_size, rank, accounting.flops_per_token, hardware, calibration
        )
        result.update(est)
        result["fits"] = result["peak_gib_traced"] <= 0.9 * gpu_memory_gib
    return result


def simulated(
    cfg,
    dims: ParallelDims,
    world_size: int,
    rank: int,
    flops_per_token: float,
    hw: Hardware | None,
    calibration: Calibration | None = None,
) -> dict:
    """The traced fields: memory and communication of a fake step, and the time estimate."""
    hw = hw or Hardware()
    trace = trace_step(cfg, world_size, rank)
    cal = calibration or Calibration.load()
    est = estimate_trace(trace, dims, world_size, flops_per_token, hw, cal)
    return {
        "peak_gib_traced": round(trace.peak_bytes / GIB, 2),
        "memory_traced_gib": {k: round(v / GIB, 2) for k, v in trace.peak_by_label.items()}
        | {"sparse_table_grads": round(trace.sparse_grad_bytes / GIB, 2)},
        "comm_gib_per_step": comm_summary(trace.collectives, trace.axis_names),
        **est,
        "hardware": hw.as_dict(),
        "traced_microbatches": f"2 of {trace.microbatches}" if trace.microbatches > 1 else "1",
        "trace_s": round(trace.trace_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--world_size",
        type=int,
        default=None,
        help="default: nodes x GPUs of the recipe ([launch] is not needed: the "
        "product of the parallel degrees)",
    )
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--gpu_memory_gib", type=float, default=80.0)
    parser.add_argument(
        "--analytical", action="store_true", help="skip the traced step (seconds, not a minute)"
    )
    defaults = Hardware()
    for name, value in defaults.as_dict().items():
        parser.add_argument(f"--{name}", type=type(value), default=value, help="cost model")
    ns, overrides = parser.parse_known_args(argv)
    world = ns.world_size or _world_from_config(ns.config, overrides)
    hardware = Hardware(**{k: getattr(ns, k) for k in defaults.as_dict()})
    result = dry_run(
        ns.config, overrides, world, ns.rank, ns.gpu_memory_gib, not ns.analytical, hardware
    )
    print(
        f"flavor {result['flavor']} at world size {world} (rank {ns.rank}): "
        f"layout {result['layout']}"
    )
    print(
        f"  total params {result['total_params'] / 1e9:.2f} B, activated "
        f"{result['activated_params'] / 1e9:.2f} B, {result['flops_per_token'] / 1e9:.1f} "
        "GFLOP/token (training)"
    )
    print(
        f"  this rank holds {result['rank_dense_params'] / 1e9:.3f} B dense params and "
        f"{result['rank_table_params'] / 1e9:.3f} B Engram table params"
    )
    print("  analytical memory:")
    for key, value in result["memory_gib"].items():
        print(f"  {key:>18}: {value:8.2f} GiB")
    if "peak_gib_traced" in result:
        _print_simulated(result)
    print(f"  {'budget':>18}: {ns.gpu_memory_gib:8.2f} GiB (fits within 90 %: {result['fits']})")
    print(json.dumps(result))
    return 0 if result["fits"] else 1


def _print_simulated(result: dict) -> None:
    print(f"  traced memory (peak {result['peak_gib_traced']:.2f} GiB):")
    for key, value in result["memory_traced_gib"].items():
        print(f"  {key:>18}: {value:8.2f} GiB")
    print("  communication per step (GiB sent by this rank):")
    for key, value in result["comm_gib_per_step"].items():
        print(f"  {key:>30}: {value:9.3f}")
    print(
        f"  step {result['est_step_s']:.3f} s = compute {result['est_compute_s']:.3f} s (optimizer "
        f"{result['est_optimizer_s']:.3f} s, Engram {result['est_engram_s']:.3f} s) + exposed "
        f"communication {result['est_exposed_comm_s']:.3f} s (of {result['est_comm_s']:.3f} s); "
        f"{result['est_tokens_per_s']:,} tokens/s, MFU {100 * result['est_mfu']:.1f} %"
    )
    cal = result["calibration"]
    print(f"  roofline calibrated on {cal['device']} (torch {cal['torch']}, {cal['date']})")


def _world_from_config(path: str, overrides: list[str]) -> int:
    p = load_config(path, overrides).parallelism
    if p.data_parallel_shard_degree == -1:
        raise ValueError("pass --world_size: data_parallel_shard_degree=-1 takes the rest of it")
    return (
        p.data_parallel_replicate_degree
        * p.data_parallel_shard_degree
        * p.tensor_parallel_degree
        * p.pipeline_parallel_degree
        * p.context_parallel_degree
    )


if __name__ == "__main__":
    sys.exit(main())
