"""Engram table access behind one interface.

``EngramTable`` is the in-memory flat table (one per Engram layer, per-head offsets). Host-resident,
tiered (hot-row cache / NVMe) and row-sharded tables implement the same calls,
``forward(hash_ids, plan)`` and ``planner()`` (a picklable callable the loader runs to make
``plan``; None when the table needs no plan), so the Engram module never knows where rows live.

Legend: B batch, T sequence, K heads, Dh head dim, R total rows.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.batch import host_side, register_pytree, unique_per_chunk
from data.ngram_hash import head_offsets
from models.sharded_init import local_rows


@dataclass
class RowPlan:
    """The deduplicated lookups of one in-memory table for one batch, made in the loader.

    Per row chunk (C = 1, or the pipeline microbatches), as ``data.batch.unique_per_chunk``
    makes them. The unique ids stay on the host: the backward merges them into the step's row
    buffer without reading the device.
    """

    unique_ids: Any  # [C, U] sorted flat row ids per chunk, 0-padded; stays on the host
    counts: Any  # [C] valid ids per chunk; stays on the host
    inverse: Any  # [B, T, K] position of every lookup in its chunk's unique ids

    def to_torch(self) -> RowPlan:
        unique, counts, inverse = (
            torch.as_tensor(f) for f in (self.unique_ids, self.counts, self.inverse)
        )
        return RowPlan(host_side(unique), host_side(counts), inverse)

    def pin_memory(self) -> RowPlan:
        return RowPlan(self.unique_ids, self.counts, self.inverse.pin_memory())

    def to(self, device, non_blocking: bool = False) -> RowPlan:
        return RowPlan(
            self.unique_ids, self.counts, self.inverse.to(device, non_blocking=non_blocking)
        )

    def rows(self, chunk: int = 0) -> np.ndarray:
        """The sorted unique flat rows of ``chunk`` (host numpy, read without the device)."""
        count = int(np.asarray(self.counts)[chunk])
        return np.asarray(self.unique_ids)[chunk, :count].astype(np.int64, copy=False)


register_pytree(RowPlan)  # the pipeline schedule chunks it with the batch


@dataclass
class RowPlanner:
    """The loader-side planner of an in-memory table with sparse gradients, or of an offloaded
    one (``models.tables.offload``): picklable, pure numpy."""

    offsets: np.ndarray  # [K] head offsets of the layer's flat table

    def __call__(self, hash_ids: np.ndarray, num_chunks: int = 1) -> RowPlan:
        return RowPlan(*unique_per_chunk(np.asarray(hash_ids) + self.offsets, num_chunks))


class EngramTable(nn.Module):
    """One flat ``[R, Dh]`` table with per-head offsets into it.

    Args:
        table_sizes: prime size of every head, order-major.
        head_dim: Dh.
        sparse: produce sparse gradients (touched rows only) for the row-wise optimizer.
    """

    def __init__(self, table_sizes: list[int], head_dim: int, sparse: bool = True):
        super().__init__()
        self.table_sizes = [int(s) for s in table_sizes]
        self.head_dim = head_dim
        self.sparse = sparse
        self.offsets_np = head_offsets(self.table_sizes)
        self.register_buffer("offsets", self._offsets(), persistent=False)
        self.weight = nn.Parameter(torch.empty(sum(self.table_sizes), head_dim))
        self.grad_rows = RowGradBuffer()

    def _offsets(self) -> torch.Tensor:
        return torch.from_numpy(self.offsets_np.copy())

    def planner(self) -> RowPlanner | None:
        """Sparse gradients: the rows each batch touches, deduplicated in the loader, so that
        the backward accumulates into one buffer of the step's rows (``accumulate_rows``)."""
        return RowPlanner(self.offsets_np.copy()) if self.sparse else None

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def flat_ids(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """Per-head ids ``[B, T, K]`` -> flat row ids ``[B, T, K]``."""
        return hash_ids + self.offsets

    def lookup_flat(self, flat_ids: torch.Tensor) -> torch.Tensor:
        if self.sparse:  # inductor cannot take sparse gradients: compiled blocks run it eagerly
            return _sparse_lookup(flat_ids, self.weight)
        return F.embedding(flat_ids, self.weight)

    def forward(self, hash_ids: torch.Tensor, plan: RowPlan | None = None) -> torch.Tensor:
        flat = self.flat_ids(hash_ids)
        if plan is None or not (self.sparse and torch.is_grad_enabled()):
            return self.lookup_flat(flat)  # [B, T, K] -> [B, T, K, Dh]
        if plan.unique_ids.shape[0] != 1:
            raise ValueError(
                f"the lookup plan covers {plan.unique_ids.shape[0]} row chunks but reached one "
                "lookup: plan with num_chunks equal to the pipeline microbatches"
            )
        rows = plan.rows(0)  # host
        return _buffered_lookup(self.weight, flat, self.grad_rows, rows, plan.inverse)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The non-persistent head offsets (recomputed after a meta build or a load)."""
        self.offsets.copy_(self._offsets())

    @torch.no_grad()
    def init_weights(self) -> None:
        self.init_buffers()
        weight, first_row = local_rows(self.weight)
        init_table_rows(weight, first_row)


@torch.compiler.disable
def _sparse_lookup(flat_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(flat_ids, weight, sparse=True)


class RowGradBuffer:
    """The step's row buffer of a table's sparse gradient.

    It is ``weight.grad``: a coalesced sparse tensor over the sorted union of the rows this
    step's lookups touched. Each lookup's backward adds into it in place (``add``); a microbatch
    with rows the buffer lacks grows it once. Nothing grows with the number of lookups or
    microbatches, and nothing needs ``coalesce()``. The rows come from the loader's plan, on the
    host, so no step reads the device to learn them.
    """

    def __init__(self):
        self._grad: weakref.ref | None = None  # the sparse gradient this buffer made
        self.rows: np.ndarray | None = None  # its rows, sorted, on the host

    @torch.no_grad()
    def add(self, weight, unique: np.ndarray, inverse: torch.Tensor, grad: torch.Tensor) -> None:
        """Add one lookup's gradient ``grad [..., Dh]`` of rows ``unique`` (sorted, the host)
        at ``inverse`` (each lookup's position in ``unique``) into ``weight.grad``."""
        values = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        inverse = inverse.reshape(-1)
        held = weight.grad
        if held is None or self._grad is None or held is not self._grad():
            buffer = _sparse_rows(weight, unique, values.new_zeros(len(unique), values.shape[1]))
            buffer._values().index_add_(0, inverse, values)
            if held is None:
                self._hold(weight, buffer, unique)
            else:  # a gradient this buffer did not make: add to it, and do not claim the sum
                weight.grad, self._grad = held + buffer, None
            return
        merged = np.union1d(self.rows, unique)
        if len(merged) > len(self.rows):  # rows this step has not touched yet: grow the buffer
            grown = values.new_zeros(len(merged), values.shape[1])
            grown.index_copy_(0, _positions(merged, self.rows, grown.device), held._values())
            held = _sparse_rows(weight, merged, grown)
            self._hold(weight, held, merged)
        positions = _positions(merged, unique, values.device)
        held._values().index_add_(0, positions[inverse], values)

    def _hold(self, weight, grad: torch.Tensor, rows: np.ndarray) -> None:
        weight.grad = grad
        self._grad, self.rows = weakref.ref(grad), rows


def host_to_device(values: np.ndarray, device) -> torch.Tensor:
    """Host integers on ``device``: on CUDA through page-locked memory, asynchronously (a copy
    from pageable memory would wait for the stream)."""
    host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _positions(merged: np.ndarray, rows: np.ndarray, device) -> torch.Tensor:
    return host_to_device(np.searchsorted(merged, rows), device)


def _sparse_rows(weight, rows: np.ndarray, values: torch.Tensor) -> torch.Tensor:
    indices = host_to_device(rows, values.device).unsqueeze(0)
    return torch.sparse_coo_tensor(
        indices, values, weight.shape, is_coalesced=True, check_invariants=False
    )


class _BufferedLookup(torch.autograd.Function):
    """``F.embedding`` whose backward adds into the table's step row buffer
    (``EngramTable.accumulate_rows``) instead of returning a sparse gradient to accumulate."""

    @staticmethod
    def forward(ctx, weight, flat_ids, buffer, unique, inverse):
        ctx.weight, ctx.buffer, ctx.unique = weight, buffer, unique
        ctx.save_for_backward(inverse)
        return F.embedding(flat_ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        ctx.buffer.add(ctx.weight, ctx.unique, inverse, grad)
        return None, None, None, None, None


@torch.compiler.disable  # inductor cannot trace the host-side merge
def _buffered_lookup(weight, flat_ids, buffer, unique, inverse) -> torch.Tensor:
    return _BufferedLookup.apply(weight, flat_ids, buffer, unique, inverse)


INIT_BLOCK_ROWS = 1 << 16


@torch.no_grad()
def init_table_rows(weight: torch.Tensor, first_row: int, std: float = 1.0) -> None:
    """N(0, std) rows (nn.Embedding's default, as in the reference), block by block.

    Every block of ``INIT_BLOCK_ROWS`` global rows comes from its own generator seeded by
    ``(seed, block)``, so a row's initial value does not depend on how the table is sharded. The
    seed is one draw from the global RNG (deterministic under ``manual_seed``), made here so every
    table, whole or sharded, draws it the same way.
    """
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    rows, dim = weight.shape
    done = 0
    while done < rows:
        global_row = first_row + done
        block, within = divmod(global_row, INIT_BLOCK_ROWS)
        count = min(rows - done, INIT_BLOCK_ROWS - within)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.randn(within + count, dim, generator=gen)[within:]
        weight[done : done + count].copy_(values * std)
        done += count
