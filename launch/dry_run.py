"""``python -m launch.dry_run --config FILE [--world_size N] [--rank R] [--gpu_memory_gib 80]``

Builds the job's flavor on the meta device under a fake process group at the target world size,
applies the full parallel plan for one rank, and prints parameters per rank, a per-GPU memory
estimate and FLOPs per token. The last line is a JSON summary with ``fits`` and ``peak_gib``; the
exit code is 1 when the layout does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist

from models.accounting import account
from models.flavors import resolve_model_args
from models.memory import RankCounts, estimate_memory
from models.parallel_plans import validate_parallelism
from models.parallelize import parallelize_deepseek_engram
from models.transformer import Transformer
from parallel.dims import ParallelDims
from pretrain.config import load_config


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
    config_path: str, overrides: list[str], world_size: int, rank: int, gpu_memory_gib: float
) -> dict:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg = load_config(config_path, overrides)
    args = resolve_model_args(
        cfg.model.flavor,
        cfg.model.overrides,
        vocab_size=cfg.model.vocab_size,
        seq_len=cfg.data.seq_len,
    )
    dims = ParallelDims.from_config(cfg.parallelism, world_size)  # errors before any group work
    validate_parallelism(args, dims)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        with torch.device("meta"):
            model = Transformer(args)
        mesh = dims.build_mesh("cpu") if world_size > 1 else None
        ac = cfg.activation_checkpoint.mode == "full"
        _, inner, _ = parallelize_deepseek_engram(
            model,
            dims,
            mesh,
            "cpu",
            0,
            activation_checkpoint=cfg.activation_checkpoint.mode,
            dry_run=True,
            mixed_precision=cfg.training.mixed_precision,
        )
        counts = rank_counts(inner, fsdp=dims.dp_shard > 1)
    finally:
        dist.destroy_process_group()
    tokens = cfg.training.batch_size * cfg.data.seq_len
    memory = estimate_memory(args, counts, tokens, dims.dp_degree, dims.engram_shard > 1, ac)
    accounting = account(args, cfg.data.seq_len)
    return {
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
    ns, overrides = parser.parse_known_args(argv)
    world = ns.world_size or _world_from_config(ns.config, overrides)
    result = dry_run(ns.config, overrides, world, ns.rank, ns.gpu_memory_gib)
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
    for key, value in result["memory_gib"].items():
        print(f"  {key:>18}: {value:8.2f} GiB")
    print(f"  {'budget':>18}: {ns.gpu_memory_gib:8.2f} GiB (fits within 90 %: {result['fits']})")
    print(json.dumps(result))
    return 0 if result["fits"] else 1


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
