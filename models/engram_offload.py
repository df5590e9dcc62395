"""Engram tables off the device: ``host`` and ``disk`` placements behind the ``EngramTable`` calls.

The table's rows and their row-wise Adam moments live in a ``RowStore`` (host memory or a file);
a device-side ``RowCache`` holds the rows in use (``models.row_tier``). The loader's planner
(``OffloadPlanner``, run in its workers) deduplicates each batch's rows, so the rows a batch needs
are known a batch ahead: ``OffloadedTables.prefetch(next_batch)`` makes them resident while the
current step computes.

Training is exact: the forward gathers the staged rows and returns the same values as
``EngramTable``; the backward produces the very sparse gradient ``F.embedding(sparse=True)``
produces (flat row ids in lookup order, one gradient row per lookup) on a *virtual* parameter of
the table's full shape, which owns no rows (one shared row of storage, expanded), so clipping and
the norm see the table where it always was; ``pretrain.rowwise_adam`` then updates the rows in the
cache, with the same arithmetic as for an in-memory table.

Legend: B batch, T sequence, K heads, Dh head dim, R table rows, U unique rows of a microbatch,
C plan chunks (1, or the pipeline microbatches).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from data.batch import unique_per_chunk
from data.ngram_hash import head_offsets
from models.engram_table import init_table_rows
from models.row_tier import (
    RECORD_FIELDS,
    RowCache,
    RowStore,
    TierStats,
    parse_cache_size,
    split_records,
)

log = logging.getLogger(__name__)


@dataclass
class OffloadPlan:
    """One layer's deduplicated lookups for one batch, per row chunk (``data.batch``).

    ``unique_ids`` and ``counts`` stay on the host (the tier reads them); ``inverse`` goes to the
    device. Every field has the chunks (or the batch rows) on dim 0.
    """

    unique_ids: Any  # [C, U] sorted flat row ids per chunk, 0-padded
    counts: Any  # [C] unique rows of each chunk
    inverse: Any  # [B, T, K] position of every lookup in its chunk's unique_ids

    def to_torch(self) -> OffloadPlan:
        return OffloadPlan(
            *(torch.as_tensor(f) for f in (self.unique_ids, self.counts, self.inverse))
        )

    def pin_memory(self) -> OffloadPlan:
        return OffloadPlan(self.unique_ids, self.counts, self.inverse.pin_memory())

    def to(self, device, non_blocking: bool = False) -> OffloadPlan:
        inverse = self.inverse.to(device, non_blocking=non_blocking)
        return OffloadPlan(self.unique_ids, self.counts, inverse)

    def rows(self, chunk: int = 0) -> np.ndarray:
        """The sorted unique flat rows of ``chunk`` (host numpy)."""
        count = int(self.counts[chunk])
        return np.asarray(self.unique_ids[chunk, :count], dtype=np.int64)


pytree.register_dataclass(OffloadPlan)


@dataclass
class OffloadPlanner:
    """The loader-side planner of an offloaded table: picklable, pure numpy."""

    offsets: np.ndarray  # [K] head offsets of the layer's flat table

    def __call__(self, hash_ids: np.ndarray, num_chunks: int = 1) -> OffloadPlan:
        return OffloadPlan(*unique_per_chunk(np.asarray(hash_ids) + self.offsets, num_chunks))


class _StagedLookup(torch.autograd.Function):
    """``staged[inverse]`` whose gradient goes to the virtual table parameter, built exactly as
    ``F.embedding(flat_ids, weight, sparse=True)`` builds it."""

    @staticmethod
    def forward(ctx, weight, staged, unique, inverse):
        ctx.save_for_backward(unique, inverse)
        ctx.shape = weight.shape
        return staged[inverse]  # [U, Dh] -> [B, T, K, Dh]

    @staticmethod
    def backward(ctx, grad):
        unique, inverse = ctx.saved_tensors
        flat = unique[inverse].reshape(1, -1)  # flat row ids in lookup order
        values = grad.reshape(-1, grad.shape[-1])
        return (
            torch.sparse_coo_tensor(flat, values, ctx.shape, check_invariants=False),
            None,
            None,
            None,
        )


class OffloadedEngramTable(nn.Module):
    """One layer's flat table in a host or disk tier, with ``EngramTable``'s calls.

    Args:
        table_sizes: prime size of every head (order-major).
        head_dim: Dh.
        store: the rows' home (``RowStore`` of width 3 * Dh).
        cache: the device slots in front of it.
    """

    def __init__(self, table_sizes: list[int], head_dim: int, store: RowStore, cache: RowCache):
        super().__init__()
        self.table_sizes = [int(s) for s in table_sizes]
        self.head_dim, self.store, self.cache = head_dim, store, cache
        self.sparse = True
        self.offsets_np = head_offsets(self.table_sizes)
        rows = sum(self.table_sizes)
        # the virtual parameter: the table's shape, one row of storage (never read)
        self.weight = nn.Parameter(
            torch.zeros(1, head_dim, device=cache.device).expand(rows, head_dim)
        )
        self.weight.engram_tier = self  # pretrain.rowwise_adam updates the rows here
        self._step_rows: list[np.ndarray] = []

    @property
    def num_rows(self) -> int:
        return self.store.num_rows

    def planner(self) -> OffloadPlanner:
        return OffloadPlanner(self.offsets_np)

    def _apply(self, fn, recurse=True):
        return self  # the rows live in the tier; moving or materialising the module moves nothing

    def forward(self, hash_ids: torch.Tensor, plan: OffloadPlan | None = None) -> torch.Tensor:
        """``hash_ids [B, T, K]`` -> rows ``[B, T, K, Dh]`` through the loader's ``plan``."""
        if plan is None:
            plan = self.planner()(hash_ids.cpu().numpy()).to_torch().to(hash_ids.device)
        if len(plan.counts) != 1:
            raise ValueError(
                f"the lookup plan covers {len(plan.counts)} row chunks but reached one lookup: "
                "plan with num_chunks equal to the pipeline microbatches"
            )
        rows = plan.rows(0)
        train = torch.is_grad_enabled() and self.weight.requires_grad
        staged = split_records(self.cache.acquire(rows, train=train))[0]  # the weights
        if train:
            self._step_rows.append(rows)
        device = self.cache.device
        unique = torch.from_numpy(rows).to(device, non_blocking=True)
        return _StagedLookup.apply(self.weight, staged, unique, plan.inverse.to(device))

    def step_rows(self) -> np.ndarray:
        """Sorted unique rows looked up since the last optimizer step (the rows of the
        coalesced gradient, in its order)."""
        return (
            np.unique(np.concatenate(self._step_rows)) if self._step_rows else np.zeros(0, np.int64)
        )

    def step_done(self) -> None:
        self._step_rows = []
        self.cache.step_done()

    def prefetch(self, plan: OffloadPlan) -> None:
        for chunk in range(len(plan.counts)):
            self.cache.prefetch(plan.rows(chunk))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The rows as a view of the store (a memory map on disk: nothing is copied); the
        cache is written back first."""
        self.cache.flush()
        destination[prefix + "weight"] = self.store.field("weight")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *rest):
        key = prefix + "weight"
        if key not in state_dict:
            missing.append(key)
            return
        value = state_dict[key]
        target = self.store.field("weight")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{key}: the checkpoint's table is {tuple(value.shape)}, this one "
                f"{tuple(target.shape)} (another Engram table configuration)"
            )
        if value.data_ptr() != target.data_ptr():  # not already loaded in place (DCP)
            self.cache.flush()
            for start in range(0, target.shape[0], 1 << 16):  # bounded temporary copies
                target[start : start + (1 << 16)] = value[start : start + (1 << 16)]
            self.store.sync()
        self.cache.invalidate()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The same rows ``EngramTable`` initialises (one draw of the global RNG, blocks seeded
        by it), written to the store block by block; the moments start at zero."""
        self.cache.invalidate()
        if self.store.placement == "disk":
            log.info("initialising %d rows of %s", self.num_rows, self.store.path)
        init_table_rows(self.store.field("weight"), 0)
        if not self.store.fresh:  # a new store is zeros already (no pass over a disk file)
            for name in RECORD_FIELDS[1:]:
                self.store.field(name).zero_()
        self.store.fresh = False
        self.store.sync()


class OffloadedTables:
    """The offloaded tables of a model: prefetch of a batch's rows and per-tier metrics."""

    def __init__(self, model: nn.Module):
        self.tables = {
            e.layer_id: e.table
            for e in model.engram_layers()
            if isinstance(e.table, OffloadedEngramTable)
        }

    def __bool__(self) -> bool:
        return bool(self.tables)

    def prefetch(self, batch) -> None:
        """Start making ``batch``'s rows resident (the next batch, while this step computes)."""
        for layer, table in self.tables.items():
            inputs = batch.engram.get(layer)
            if inputs is not None and inputs.plan is not None:
                table.prefetch(inputs.plan)

    def take_stats(self) -> TierStats:
        total = TierStats()
        for table in self.tables.values():
            for key, value in vars(table.cache.stats.take()).items():
                setattr(total, key, getattr(total, key) + value)
        return total


def place_engram_tables(
    model: nn.Module,
    placement: str,
    cache_size: str,
    device,
    folder: str | Path | None = None,
    hash_config: dict | None = None,
    min_cache_rows: int = 0,
) -> list[OffloadedEngramTable]:
    """Swap every Engram table of ``model`` (built on meta, not yet materialised) for an offloaded
    one in ``placement`` ("host" or "disk"; "device" changes nothing). Returns the new tables.

    Args:
        cache_size: ``engram_table.cache_size`` (rows, a share of rows, or bytes).
        device: the compute device, where the cache lives.
        folder: disk: the folder of the record files (one subfolder per layer).
        hash_config: the Engram hash configuration, pinned beside every disk table.
        min_cache_rows: the cache never gets fewer slots (the lookups of the microbatches of
            one step plus one prefetched microbatch: what must be resident at once).
    """
    if placement == "device":
        return []
    device = torch.device(device)
    fingerprint = hashlib.sha256(json.dumps(hash_config or {}, sort_keys=True).encode()).hexdigest()
    tables = []
    for engram in model.engram_layers():
        old = engram.table
        rows, width = sum(old.table_sizes), len(RECORD_FIELDS) * old.head_dim
        identity = {
            "layer": engram.layer_id,
            "table_sizes": list(old.table_sizes),
            "head_dim": old.head_dim,
            "hash_sha256": fingerprint,
        }
        subfolder = Path(folder) / f"layer{engram.layer_id}" if folder is not None else None
        if placement == "disk" and subfolder is None:
            raise ValueError("engram_table.placement='disk' needs engram_table.path")
        store = RowStore(rows, width, placement, subfolder, identity, pin=device.type == "cuda")
        slots = parse_cache_size(cache_size, rows, width * 4)
        if slots < min(min_cache_rows, rows):
            log.info(
                "layer %d: engram_table.cache_size=%s gives %d rows; raised to %d, the rows a "
                "step and one prefetched microbatch may use",
                engram.layer_id,
                cache_size,
                slots,
                min(min_cache_rows, rows),
            )
            slots = min(min_cache_rows, rows)
        engram.table = OffloadedEngramTable(
            old.table_sizes, old.head_dim, store, RowCache(store, slots, device)
        )
        tables.append(engram.table)
    return tables


def tier_scalars(stats: TierStats, seconds: float) -> dict[str, float]:
    """The tiers' metrics over ``seconds`` of training steps (CONVENTIONS names)."""
    seconds = max(seconds, 1e-9)
    return {
        "engram/cache_hit_rate": stats.hits / max(stats.lookups, 1),
        "engram/prefetch_wait(%)": 100.0 * stats.wait_seconds / seconds,
        "engram/rows_per_s": stats.lookups / seconds,
        "engram/read_MiB_per_s": stats.bytes_read / 2**20 / seconds,
        "engram/write_MiB_per_s": stats.bytes_written / 2**20 / seconds,
    }
