"""``parallelize_deepseek_engram``: applies the parallel plan to the model family (../STYLE rule 1).

Order (../STYLE rule 2): the model arrives on the meta device; Engram tables are swapped for their
row shards and FSDP shards the rest there; then the model is materialised and initialised
deterministically; DDP wraps a materialised model.

Today: data parallelism (DDP over replicas, FSDP2/HSDP over the dp_shard axis) and Engram-table
parallelism over the data-parallel ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from models.engram_table import init_table_rows
from parallel.data_parallel import all_reduce_grads_, apply_ddp, apply_fsdp
from parallel.dims import ParallelDims
from parallel.engram_table_parallel import ShardedEngramTable


def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def parallelize_deepseek_engram(model: nn.Module, dims: ParallelDims, mesh, device, seed: int):
    """Returns ``(model to call, the plain Transformer underneath)``."""
    if dims.world_size == 1:
        return materialize(model, device, seed), model
    if dims.etp > 1:
        group = mesh["dp_replicate"].get_group()
        cpu_group = (
            group
            if dist.get_backend(group) == "gloo"
            else dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
        )
        apply_engram_table_parallel(model, group, cpu_group, dims.dp_degree)
    if dims.dp_shard > 1:
        if any(engram.table.sparse for engram in model.engram_layers()):
            raise ValueError(
                "FSDP (parallelism.data_parallel_shard_degree > 1) cannot shard sparse gradients: "
                "set --model.overrides.engram.sparse_grad=false, or use "
                "parallelism.data_parallel_replicate_degree"
            )
        apply_fsdp(model, mesh, list(model.layers.values()))
        return materialize(model, device, seed), model
    materialize(model, device, seed)
    unmanaged = {id(p) for p in sparse_grad_params(model) + sharded_table_params(model)}
    names = [n for n, p in model.named_parameters() if id(p) in unmanaged]
    return apply_ddp(model, mesh, names), model


def sparse_grad_params(model: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters with sparse gradients (Engram tables), averaged by
    ``all_reduce_grads_``; row-sharded tables are excluded (their owners already hold the sum)."""
    return [
        e.table.weight
        for e in model.engram_layers()
        if e.table.sparse and not isinstance(e.table, ShardedEngramTable)
    ]


def sharded_table_params(model: nn.Module) -> list[nn.Parameter]:
    return [
        e.table.weight for e in model.engram_layers() if isinstance(e.table, ShardedEngramTable)
    ]


def apply_engram_table_parallel(model: nn.Module, group, cpu_group, dp_degree: int) -> None:
    """Swap every Engram table for its row shard over ``group`` (before materialisation).

    ``dp_degree``: how many data-parallel replicas feed the tables; the owners' gradients are scaled
    by its inverse so an update equals the data-parallel average.
    """
    for engram in model.engram_layers():
        table = engram.table
        device = table.weight.device
        engram.table = ShardedEngramTable(
            table.table_sizes,
            table.head_dim,
            group,
            cpu_group,
            1.0 / dp_degree,
            init_table_rows,
            device=device,
        )


def sync_unmanaged_grads(model: nn.Module, inner: nn.Module, group) -> None:
    """After backward: average the gradients DDP does not manage (sparse Engram tables)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        all_reduce_grads_(sparse_grad_params(inner), group)
