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
    module: nn.Module, names: list[str], group, global_rows: int, first_row: int
) -> None:
    """Mark ``module.<name>`` (rows ``first_row...`` of a tensor with ``global_rows`` rows) as
    row-sharded. Loading accepts a global DTensor or the full plain tensor (its rows are sliced)."""
    module.sharded_params = list(names)
    module._shard_first_row = first_row
    module._shard_group, module._shard_rows, module._shard_mesh = group, global_rows, None
    module.to_global = types.MethodType(_to_global, module)
    module._register_state_dict_hook(_state_dict_as_global)
    module._register_load_state_dict_pre_hook(_load_state_dict_local, with_module=True)


def _to_global(module, local: torch.Tensor):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

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


def _load_state_dict_local(module, state_dict, prefix, *args):
    for name in module.sharded_params:
        value = state_dict.get(prefix + name)
        if value is None:
            continue
        if hasattr(value, "to_local"):
            state_dict[prefix + name] = value.to_local()
        elif value.shape[0] == module._shard_rows:  # a full tensor: keep this rank's rows
            rows = getattr(module, name).shape[0]
            start = module._shard_first_row
            state_dict[prefix + name] = value[start : start + rows]
