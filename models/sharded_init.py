"""Helpers that keep weight initialisation independent of how a weight is sharded."""

from __future__ import annotations

import torch


def local_rows(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's rows of ``weight`` and the global index of the first one.

    A plain tensor is all rows from 0; a ``Shard(0)`` DTensor (FSDP) gives its local shard. Used by
    inits that must not depend on the sharding.
    """
    if not hasattr(weight, "to_local"):
        return weight, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(
        weight.shape, weight.device_mesh, weight.placements
    )
    return weight.to_local(), int(offset[0])


def init_param_(param: torch.Tensor, fill) -> None:
    """Apply the in-place init ``fill`` so a sharded (DTensor) parameter receives its slice of what
    ``fill`` gives the full tensor: the same random draws in the same order as one process.

    Costs a full-size temporary per parameter (row-sharded tables and experts use per-row or
    per-expert generators instead and never come here).
    """
    if not hasattr(param, "to_local"):
        fill(param)
        return
    from torch.distributed.tensor import distribute_tensor

    full = torch.empty(param.shape, dtype=param.dtype)
    fill(full)
    local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.to_local().copy_(local.to_local())


def normal_(param: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> None:
    init_param_(param, lambda t: torch.nn.init.normal_(t, mean=mean, std=std))


def trunc_normal_(param: torch.Tensor, std: float = 1.0, a: float = -2.0, b: float = 2.0) -> None:
    init_param_(param, lambda t: torch.nn.init.trunc_normal_(t, std=std, a=a, b=b))


def kaiming_uniform_(param: torch.Tensor, a: float = 0.0) -> None:
    init_param_(param, lambda t: torch.nn.init.kaiming_uniform_(t, a=a))
