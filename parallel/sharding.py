"""Row-sharded parameters that checkpoint as global ``Shard(0)`` DTensors.

Engram-table shards and expert-parallel expert weights are plain local parameters (sparse
gradients and grouped matmuls need plain tensors). ``register_row_sharding`` makes their
state-dict entries global DTensor views (no copy), so DCP saves one global tensor and reloads
it at any other sharding.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def register_row_sharding(
    module: nn.Module,
    names: list[str],
    group,
    global_rows: int,
    first_row: int,
    real_rows: int | None = None,
) -> None:
    """Mark ``module.<name>`` (rows ``first_row...`` of a tensor with ``global_rows`` rows) as
    row-sharded. Loading accepts a global DTensor or the full plain tensor (its rows are sliced).

    ``real_rows``: how many of the local rows are real; the rest are padding (expert slots no
    token is routed to), left out of the global view and kept as they are on load.
    """
    module.sharded_params = list(names)
    module._shard_first_row = first_row
    module._shard_group, module._shard_rows, module._shard_mesh = group, global_rows, None
    module._shard_real_rows = real_rows
    module.to_global = types.MethodType(_to_global, module)
    module.from_global = types.MethodType(_from_global, module)
    module._register_state_dict_hook(_state_dict_as_global)
    module._register_load_state_dict_pre_hook(_load_state_dict_local, with_module=True)


def _to_global(module, local: torch.Tensor):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    if module._shard_real_rows is not None:
        local = local[: module._shard_real_rows]  # padding rows stay out of the global view
    if module._shard_mesh is None:
        module._shard_mesh = DeviceMesh.from_group(module._shard_group, local.device.type)
    shape = (module._shard_rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, module._shard_mesh, [Shard(0)], run_check=False, shape=shape, stride=stride
    )


def _state_dict_as_global(module, state_dict, prefix, local_metadata):
    for name in module.sharded_params:
        key = prefix + name
        if key in state_dict and not hasattr(state_dict[key], "to_local"):
            state_dict[key] = module.to_global(state_dict[key])
    return state_dict


def _from_global(module, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``value`` (a global DTensor, or the full plain tensor), shaped like
    the local tensor ``like`` (padding rows taken from ``like``)."""
    if hasattr(value, "to_local"):
        local = value.to_local()
    elif value.shape[0] == module._shard_rows:  # a full tensor: keep this rank's rows
        start = module._shard_first_row
        local = value[start : start + like.shape[0]]
    else:
        return value
    if local.shape[0] < like.shape[0]:  # padding rows: keep the local ones
        local = torch.cat([local.to(like.device, like.dtype), like[local.shape[0] :].detach()])
    return local


def _load_state_dict_local(module, state_dict, prefix, *args):
    for name in module.sharded_params:
        value = state_dict.get(prefix + name)
        if value is not None:
            state_dict[prefix + name] = _from_global(module, value, getattr(module, name))
