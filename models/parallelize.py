"""``parallelize_deepseek_engram``: applies the parallel plan to the model family (../STYLE rule 1).

Order (../STYLE rule 2): the model arrives on the meta device; FSDP shards it there; then it is
materialised and initialised deterministically; DDP wraps a materialised model.

Today: data parallelism. DDP when only replicas are used (it handles sparse Engram-table gradients),
FSDP2/HSDP when the dp_shard axis is > 1 (tables then need dense gradients).
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.data_parallel import all_reduce_grads_, apply_ddp, apply_fsdp
from parallel.dims import ParallelDims


def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def parallelize_deepseek_engram(model: nn.Module, dims: ParallelDims, mesh, device, seed: int):
    """Returns ``(model to call, the plain Transformer underneath)``."""
    if dims.world_size == 1:
        return materialize(model, device, seed), model
    if dims.dp_shard > 1:
        if any(engram.table.sparse for engram in model.engram_layers()):
            raise ValueError(
                "FSDP (parallelism.data_parallel_shard_degree > 1) cannot shard sparse gradients: "
                "set "
                "--model.overrides.engram.sparse_grad=false, or use data_parallel_replicate_degree"
            )
        apply_fsdp(model, mesh, list(model.layers.values()))
        return materialize(model, device, seed), model
    materialize(model, device, seed)
    sparse_ids = {id(p) for p in sparse_grad_params(model)}
    names = [n for n, p in model.named_parameters() if id(p) in sparse_ids]
    return apply_ddp(model, mesh, names), model


def sparse_grad_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with sparse gradients (Engram tables), averaged by ``all_reduce_grads_``."""
    return [engram.table.weight for engram in model.engram_layers() if engram.table.sparse]


def sync_unmanaged_grads(model: nn.Module, inner: nn.Module, group) -> None:
    """After backward: average the gradients DDP does not manage (sparse Engram tables)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        all_reduce_grads_(sparse_grad_params(inner), group)
