"""Engram tables off the device: ``host`` and ``disk`` placements behind the ``EngramTable`` calls.

The table's rows and their row-wise Adam moments live in a ``RowStore`` (host memory or a file);
a device-side ``RowCache`` holds the rows in use (``models.tables.tier``). The loader's planner
(``RowPlanner``, run in its workers) deduplicates each batch's rows, so the rows a batch needs
are known a batch ahead: ``OffloadedTables.prefetch(next_batch)`` makes them resident while the
current step computes.

Training is exact: the forward gathers the staged rows and returns the same values as
``EngramTable``; the backward adds into the same step row buffer (``RowGradBuffer``: a coalesced
sparse gradient over the step's rows) as an in-memory table's, on a *virtual* parameter of the
table's full shape, which owns no rows (one shared row of storage, expanded), so clipping and the
norm see the table where it always was; ``pretrain.rowwise_adam`` then updates the rows in the
cache, with the same arithmetic as for an in-memory table.

Legend: B batch, T sequence, K heads, Dh head dim, R table rows, U unique rows of a microbatch,
C plan chunks (1, or the pipeline microbatches).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from data.batch import host_side
from data.ngram_hash import head_offsets
from models.tables.table import (
    INIT_BLOCK_ROWS,
    RowGradBuffer,
    RowPlan,
    RowPlanner,
    host_to_device,
    init_table_rows,
)
from models.tables.tier import (
    RowCache,
    RowStore,
    TierStats,
    parse_cache_size,
    record_layout,
    rows_key,
)
from parallel.engram_table_parallel import ShardedEngramTable, ShardPlan, ShardPlanner

log = logging.getLogger(__name__)


class _StagedLookup(torch.autograd.Function):
    """``staged[inverse]`` whose gradient goes where the table's device twin puts it: into the
    virtual parameter's step row buffer, as an in-memory table's (``RowGradBuffer``), or, for a
    row shard (``buffer`` None), as the very sparse gradient ``F.embedding(sparse=True)`` makes
    (one row per lookup), as a device row shard's, whose requested rows are known only on the
    device."""

    @staticmethod
    def forward(ctx, weight, staged, buffer, rows, inverse):
        ctx.weight, ctx.buffer, ctx.rows = weight, buffer, rows
        ctx.save_for_backward(inverse)
        return staged[inverse]  # [U, Dh] -> [B, T, K, Dh]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if ctx.buffer is not None:
            ctx.buffer.add(ctx.weight, ctx.rows, inverse, grad)
            return None, None, None, None, None
        flat = host_to_device(ctx.rows, inverse.device)[inverse].reshape(1, -1)
        values = grad.reshape(-1, grad.shape[-1])
        coo = torch.sparse_coo_tensor(flat, values, ctx.weight.shape, check_invariants=False)
        return coo, None, None, None, None


class TierRows:
    """The rows of a table, or of this rank's row shard, in a tier (mixed into a table module).

    Holds the virtual parameter ``weight`` (the local rows' shape, one expanded row of storage,
    never read; ``weight.engram_tier`` points here for ``pretrain.rowwise_adam``), looks rows up
    through the cache with embedding's exact gradient, records the rows of the step for the
    optimizer, and puts the store's rows in state dicts.
    """

    store: RowStore
    cache: RowCache
    row_start: int = 0  # the first global row of the store (0 for a whole table)

    def _init_tier(self, head_dim: int, store: RowStore, cache: RowCache) -> None:
        self.store, self.cache = store, cache
        self.weight = nn.Parameter(
            torch.zeros(1, head_dim, device=cache.device).expand(store.num_rows, head_dim)
        )
        self.weight.engram_tier = self
        self.grad_rows = RowGradBuffer()
        self._step_rows: list[np.ndarray] = []

    def _tier_lookup(self, rows: np.ndarray, inverse: torch.Tensor) -> torch.Tensor:
        """Rows ``[..., Dh]`` of the local ``rows`` (sorted, unique) at positions ``inverse``."""
        train = torch.is_grad_enabled() and self.weight.requires_grad
        staged = self.cache.acquire(rows, train=train, width=self.store.layout["weight"])
        if train:
            self._step_rows.append(rows)
        inverse = inverse.to(self.cache.device)
        buffer = None if isinstance(self, ShardedEngramTable) else self.grad_rows
        return _StagedLookup.apply(self.weight, staged, buffer, rows, inverse)

    def step_rows(self) -> np.ndarray:
        """Sorted unique local rows looked up since the last optimizer step (the rows of the
        coalesced gradient, in its order)."""
        return (
            np.unique(np.concatenate(self._step_rows)) if self._step_rows else np.zeros(0, np.int64)
        )

    def include_rows(self, rows: np.ndarray) -> None:
        """Update ``rows`` (sorted, unique, local) this step too: the union of every replica
        group's lookups, whose averaged gradient every group applies."""
        extra = np.setdiff1d(rows, self.step_rows(), assume_unique=True)
        if len(extra):
            self.cache.hold_for_update(extra)
            self._step_rows.append(extra)

    def step_done(self) -> None:
        self._step_rows = []
        self.cache.step_done()

    def _apply(self, fn, recurse=True):
        return self  # the rows live in the tier; moving or materialising the module moves nothing

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The rows as a view of the store (a memory map on disk: nothing is copied); the
        cache is written back first."""
        self.cache.flush()
        destination[prefix + "weight"] = self.store.field("weight")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *rest):
        for hook in self._load_state_dict_pre_hooks.values():  # as nn.Module does (shards)
            hook(state_dict, prefix, local_metadata, strict, missing, *rest)
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
            _copy_rows(target, value)
            self.store.sync()
        self.cache.invalidate()

    def load_records(self, records: torch.Tensor, name: str = "table") -> None:
        """Replace every record (rows and their optimizer state) with ``records`` (a peer's,
        fault tolerance): the cache is dropped, not written back."""
        target = self.store.records
        if tuple(records.shape) != tuple(target.shape):
            raise RuntimeError(
                f"{name}: the peer's table is {tuple(records.shape)}, this one "
                f"{tuple(target.shape)}"
            )
        self.cache.invalidate()
        if records.data_ptr() != target.data_ptr():  # not received in place
            _copy_rows(target, records)
        self.store.sync()

    @torch.no_grad()
    def _init_tier_rows(self) -> None:
        """The same rows the in-memory table initialises (one draw of the global RNG, blocks
        seeded by it), written to the store block by block; the moments start at zero."""
        self.cache.invalidate()
        if self.store.placement == "disk":
            log.info("initialising %d rows of %s", self.store.num_rows, self.store.path)
        init_table_rows(self.store.field("weight"), self.row_start)
        if not self.store.fresh:  # a new store is zeros already (no pass over a disk file)
            for name in list(self.store.layout)[1:]:
                self.store.field(name).zero_()
        self.store.fresh = False
        self.store.sync()


def _copy_rows(target: torch.Tensor, value: torch.Tensor) -> None:
    for start in range(0, target.shape[0], INIT_BLOCK_ROWS):  # bounded copies
        target[start : start + INIT_BLOCK_ROWS] = value[start : start + INIT_BLOCK_ROWS]


class OffloadedEngramTable(TierRows, nn.Module):
    """One layer's whole flat table in a host or disk tier, with ``EngramTable``'s calls.

    Args:
        table_sizes: prime size of every head (order-major).
        head_dim: Dh.
        store: the rows' home (``RowStore``: each record a row and its optimizer state).
        cache: the device slots in front of it.
    """

    def __init__(self, table_sizes: list[int], head_dim: int, store: RowStore, cache: RowCache):
        super().__init__()
        self.table_sizes = [int(s) for s in table_sizes]
        self.head_dim = head_dim
        self.sparse = True
        self.offsets_np = head_offsets(self.table_sizes)
        self._init_tier(head_dim, store, cache)

    @property
    def num_rows(self) -> int:
        return self.store.num_rows

    def planner(self) -> RowPlanner:
        return RowPlanner(self.offsets_np)

    def forward(self, hash_ids: torch.Tensor, plan: RowPlan | None = None) -> torch.Tensor:
        """``hash_ids [B, T, K]`` -> rows ``[B, T, K, Dh]`` through the loader's ``plan``."""
        if plan is None:
            plan = self.planner()(hash_ids.cpu().numpy()).to_torch().to(hash_ids.device)
        if len(plan.counts) != 1:
            raise ValueError(
                f"the lookup plan covers {len(plan.counts)} row chunks but reached one lookup: "
                "plan with num_chunks equal to the pipeline microbatches"
            )
        return self._tier_lookup(plan.rows(0), plan.inverse)

    def prefetch(self, plan: RowPlan) -> None:
        for chunk in range(len(plan.counts)):
            self.cache.prefetch(plan.rows(chunk))

    def init_weights(self) -> None:
        self._init_tier_rows()


@dataclass
class HostShardPlan(ShardPlan):
    """A ``ShardPlan`` whose unique ids stay on the host, where the owners' tiers read them."""

    def to_torch(self) -> HostShardPlan:
        plan = super().to_torch()
        return replace(plan, unique_ids=host_side(plan.unique_ids))

    def pin_memory(self) -> HostShardPlan:
        return replace(self, inverse=self.inverse.pin_memory())

    def to(self, device, non_blocking: bool = False) -> HostShardPlan:
        return replace(self, inverse=self.inverse.to(device, non_blocking=non_blocking))


pytree.register_dataclass(HostShardPlan)


@dataclass
class HostShardPlanner(ShardPlanner):
    """The loader-side planner of an offloaded row shard (picklable, pure numpy)."""

    def __call__(self, hash_ids: np.ndarray, num_chunks: int = 1) -> HostShardPlan:
        plan = super().__call__(hash_ids, num_chunks)
        return HostShardPlan(plan.unique_ids, plan.send_counts, plan.inverse)


ROUTED_KEEP = 16  # prefetched routes kept at most (a route unused that long is stale)


class OffloadedShardedTable(TierRows, ShardedEngramTable):
    """This rank's row shard of a table-parallel Engram table, in a host or disk tier.

    Lookups are routed as for ``ShardedEngramTable``, but the ids travel over the host (gloo)
    group, since the owner's tier reads them on the host. ``prefetch(plan)`` routes the next
    batch's ids a step ahead (every rank of the group calls it at the same point, as the trainer
    does) and starts making the requested rows resident; the lookup of that batch then reuses the
    route. A route is reused only when every rank of the group has its own from the same
    prefetch round (a flag sent with the split counts), so a batch that was not prefetched
    (evaluation) is routed afresh on every rank alike.

    Args:
        shard: the ``ShardedEngramTable`` (on meta) this replaces; its group, sizes and gradient
            scale are kept.
        store: the shard's rows (``RowStore``, as for ``OffloadedEngramTable``).
        cache: the device slots in front of it.
    """

    def __init__(self, shard: ShardedEngramTable, store: RowStore, cache: RowCache):
        ShardedEngramTable.__init__(
            self,
            shard.table_sizes,
            shard.offsets_np,
            shard.head_dim,
            shard.group,
            shard.cpu_group,
            shard.grad_scale,
            shard.init_rows,
            device="meta",
        )
        self.register_buffer(
            "offsets", torch.from_numpy(self.offsets_np).to(cache.device), persistent=False
        )
        self._init_tier(shard.head_dim, store, cache)
        self._routed: dict[int, tuple[int, list[int], np.ndarray]] = {}
        self._round = 0
        self.reused_routes = 0  # lookups routed by their prefetch (a count for tests and logs)

    def planner(self) -> HostShardPlanner:
        return HostShardPlanner(self.offsets_np, self.bounds)

    def _exchange_counts_and_rounds(self, send: list[int], round_: int):
        """Every rank's count for this one and its prefetch round (-1: none) for this lookup."""
        got = self.exchange_counts(torch.tensor([[count, round_] for count in send]))
        return got[:, 0].tolist(), got[:, 1].tolist()

    def _chunk_round(self, plan: HostShardPlan, chunk: int) -> int:
        """The prefetch round that routed ``chunk``'s ids (-1: none)."""
        send = [int(c) for c in plan.send_counts[chunk]]
        unique = np.asarray(plan.unique_ids[chunk, : sum(send)], dtype=np.int64)
        route = self._routed.get(rows_key(unique))
        return route[0] if route is not None else -1

    def count_columns(self, plan: HostShardPlan) -> torch.Tensor:
        """Counts ``[P, C]`` and this rank's prefetch round of every chunk ``[P, C]``."""
        counts = torch.as_tensor(plan.send_counts).T
        chunks = counts.shape[1]
        rounds = torch.tensor([self._chunk_round(plan, c) for c in range(chunks)])
        return torch.cat([counts, rounds.expand(counts.shape[0], chunks)], dim=1)

    def with_counts(self, plan: HostShardPlan, received: torch.Tensor) -> HostShardPlan:
        chunks = received.shape[1] // 2
        return replace(
            plan,
            recv_counts=host_side(received[:, :chunks].T.contiguous()),
            rounds=host_side(received[:, chunks:].T.contiguous()),
        )

    def _exchange_ids(self, unique: np.ndarray, send: list[int], recv: list[int]) -> np.ndarray:
        requested = torch.empty(sum(recv), dtype=torch.int64)
        ids = torch.from_numpy(np.ascontiguousarray(unique, dtype=np.int64))
        dist.all_to_all_single(requested, ids, recv, send, group=self.cpu_group)
        return requested.numpy()

    def _route(self, unique, send: list[int], plan: HostShardPlan) -> tuple[list[int], np.ndarray]:
        unique = np.asarray(unique, dtype=np.int64)
        route = self._routed.pop(rows_key(unique), None)
        round_ = route[0] if route is not None else -1
        if plan.recv_counts is not None:  # exchanged for the whole batch before the forward
            recv, rounds = plan.recv_counts.tolist()[0], plan.rounds.tolist()[0]
        else:
            recv, rounds = self._exchange_counts_and_rounds(send, round_)
        if route is not None and all(r == round_ for r in rounds):
            self.reused_routes += 1
            return route[1], route[2]
        return recv, self._exchange_ids(unique, send, recv)

    def _lookup_local(self, requested: np.ndarray) -> torch.Tensor:
        rows, inverse = np.unique(requested - self.row_start, return_inverse=True)
        return self._tier_lookup(rows, torch.from_numpy(inverse.reshape(-1)))

    def prefetch(self, plan: HostShardPlan) -> None:
        """Route ``plan``'s ids now (a collective of the table group) and start loading the
        rows other ranks will ask this one for."""
        for chunk in range(len(plan.send_counts)):
            send = [int(c) for c in plan.send_counts[chunk]]
            unique = np.asarray(plan.unique_ids[chunk, : sum(send)], dtype=np.int64)
            recv, _ = self._exchange_counts_and_rounds(send, -1)
            requested = self._exchange_ids(unique, send, recv)
            self._round += 1
            self._routed[rows_key(unique)] = (self._round, recv, requested)
            while len(self._routed) > ROUTED_KEEP:
                self._routed.pop(next(iter(self._routed)))
            self.cache.prefetch(np.unique(requested - self.row_start))

    @torch.no_grad()
    def init_weights(self) -> None:
        self.offsets.copy_(torch.from_numpy(self.offsets_np))
        self._init_tier_rows()


class OffloadedTables:
    """The offloaded tables of a model: prefetch of a batch's rows and per-tier metrics."""

    def __init__(self, model: nn.Module):
        self.tables = {
            e.layer_id: e.table for e in model.engram_layers() if isinstance(e.table, TierRows)
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
    engram_state: str = "adam",
) -> list[TierRows]:
    """Swap every Engram table of ``model`` (on meta, not yet materialised) for an offloaded one
    in ``placement`` ("host" or "disk"; "device" changes nothing). A whole table goes to the tier
    whole; a row shard (``ShardedEngramTable``, table parallelism) keeps its routing and puts its
    own rows in the tier. Returns the new tables.

    Args:
        cache_size: ``engram_table.cache_size`` (rows, a share of the table's or shard's rows, or
            bytes).
        device: the compute device, where the cache lives.
        folder: disk: the folder of the record files (one subfolder per layer, one below it per
            row shard, named by its global rows).
        hash_config: the Engram hash configuration, pinned beside every disk table.
        min_cache_rows: the cache never gets fewer slots (the lookups of one rank's microbatches
            of one step plus one prefetched microbatch: what must be resident at once; a shard
            may be asked for the lookups of every rank of its group).
        engram_state: ``optimizer.engram_state``, the optimizer state each record holds beside
            its row (``models.tables.tier.ENGRAM_STATES``).
    """
    if placement == "device":
        return []
    if placement == "disk" and folder is None:
        raise ValueError("engram_table.placement='disk' needs engram_table.path")
    device = torch.device(device)
    fingerprint = hashlib.sha256(json.dumps(hash_config or {}, sort_keys=True).encode()).hexdigest()
    tables = []
    for engram in model.engram_layers():
        old = engram.table
        sharded = isinstance(old, ShardedEngramTable)
        first = old.row_start if sharded else 0
        rows = old.weight.shape[0]  # the whole table's, or this shard's rows
        layout = record_layout(engram_state, old.head_dim)
        identity = {
            "layer": engram.layer_id,
            "table_sizes": list(old.table_sizes),
            "head_dim": old.head_dim,
            "hash_sha256": fingerprint,
        }
        subfolder = Path(folder) / f"layer{engram.layer_id}" if folder is not None else None
        if sharded:
            identity["rows"] = [first, first + rows]
            if subfolder is not None:
                subfolder = subfolder / f"rows{first}-{first + rows}"
        store = RowStore(rows, layout, placement, subfolder, identity, pin=device.type == "cuda")
        floor = min(min_cache_rows * (old.world if sharded else 1), rows)
        slots = parse_cache_size(cache_size, rows, store.width * 4)
        if slots < floor:
            log.info(
                "layer %d: engram_table.cache_size=%s gives %d rows; raised to %d, the rows a "
                "step and one prefetched microbatch may use",
                engram.layer_id,
                cache_size,
                slots,
                floor,
            )
            slots = floor
        cache = RowCache(store, slots, device)
        if sharded:
            engram.table = OffloadedShardedTable(old, store, cache)
        else:
            engram.table = OffloadedEngramTable(old.table_sizes, old.head_dim, store, cache)
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
