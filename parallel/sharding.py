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


TABLE_BLOCK_ROWS = 1 << 16  # rows per checkpoint item of a table (16 MiB at 64 float32 columns)


class RowBlocks(torch.Tensor):
    """A checkpoint view of rows ``first_row...`` of a ``[global_rows, D]`` tensor, saved and
    loaded by DCP in blocks of ``block_rows`` global rows (block edges do not depend on the
    sharding), so a table is streamed: DCP holds one block in memory at a time, a table in a
    file is read and written through its memory map, and any sharding loads any other.

    ``source`` holds the local rows (a tensor, a strided view of records, a memory map). The
    object itself owns no rows (one expanded row of storage): use it only as a DCP state-dict
    value. DCP reads it through its ``_Checkpointable`` hooks.
    """

    @staticmethod
    def __new__(cls, source: torch.Tensor, first_row: int, global_rows: int, block_rows=None):
        shape = (global_rows, *source.shape[1:])
        base = torch.empty(1, *shape[1:], dtype=source.dtype).expand(shape)
        blocks = base.as_subclass(cls)
        blocks._source, blocks._first_row = source, first_row
        blocks._block_rows = block_rows or TABLE_BLOCK_ROWS
        return blocks

    def _chunks(self) -> list[tuple[int, int]]:
        """``(start, stop)`` global rows of every local block piece."""
        start, stop = self._first_row, self._first_row + self._source.shape[0]
        chunks, row = [], start
        while row < stop:
            end = min(stop, (row // self._block_rows + 1) * self._block_rows)
            chunks.append((row, end))
            row = end
        return chunks

    def _chunk_md(self, start: int, stop: int):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        rest = [0] * (self.dim() - 1)
        return ChunkStorageMetadata(
            offsets=torch.Size([start, *rest]),
            sizes=torch.Size([stop - start, *self.shape[1:]]),
        )

    def __create_write_items__(self, fqn: str, obj):
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        properties = TensorProperties.create_from_tensor(self._source[:0])
        return [
            WriteItem(
                index=MetadataIndex(fqn, chunk.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=chunk, properties=properties, size=self.shape),
            )
            for chunk in (self._chunk_md(a, b) for a, b in self._chunks())
        ]

    def __create_chunk_list__(self):
        return [self._chunk_md(a, b) for a, b in self._chunks()]

    def __get_tensor_shard__(self, index):
        start = index.offset[0]
        for a, b in self._chunks():
            if a == start:
                return self._source[a - self._first_row : b - self._first_row]
        raise ValueError(f"{index.fqn}: no local block starts at row {start}")
