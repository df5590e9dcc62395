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
