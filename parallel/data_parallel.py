"""Data parallelism: DDP across replicas, FSDP2 (``fully_shard``) or HSDP over the dp mesh axes."""

from __future__ import annotations

import torch
from torch import nn


def apply_ddp(model: nn.Module, mesh) -> nn.Module:
    """Replicate with DDP over the ``dp_replicate`` axis (works with sparse Engram-table
    gradients)."""
    from torch.nn.parallel import DistributedDataParallel

    group = mesh["dp_replicate"].get_group()
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, process_group=group, device_ids=device_ids)


def apply_fsdp(model: nn.Module, mesh, blocks: list[nn.Module], reshard_after_forward: bool = True):
    """FSDP2 per block, then the root; HSDP when the mesh has a replicate axis of size > 1."""
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    return model
