"""Engram-table parallelism: each Engram layer's flat table is row-sharded over its own group.

Lookup: every rank deduplicates the rows its batch touches, sends the ids to their owners with an
all-to-all, and the owners send the rows back; gradients return to the owners the same way (the
all-to-all is autograd-aware), where they arrive as sparse row gradients for the row-wise optimizer.

Split sizes come from the host: the table's ``ShardPlanner`` runs on numpy hash ids in the
loader's workers (``data.batch`` injects it), and the per-owner counts are exchanged over a CPU
(gloo) group, so the device never has to be synchronised to learn them (the public Megatron-based
port pays a device-to-host sync here).

Rows are partitioned in contiguous blocks with ``torch.chunk`` semantics (``ceil(R / P)`` rows per
shard, the last ones possibly shorter), the same as a ``Shard(0)`` DTensor, so checkpoints reshard
(``parallel.sharding``).

Legend: B batch, T sequence, K heads, Dh head dim, U unique rows of the local batch, P group size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from data.batch import Batch, EngramInputs, host_side, unique_per_chunk
from parallel.sharding import register_row_sharding


def row_bounds(num_rows: int, num_shards: int) -> list[int]:
    """Shard boundaries ``[P + 1]`` with ``torch.chunk`` semantics."""
    size = -(-num_rows // num_shards)
    return [min(i * size, num_rows) for i in range(num_shards + 1)]


@dataclass
class ShardPlan:
    """Host-side routing of one layer's lookups for one batch, per row chunk (``data.batch``).

    The batch's rows are planned in ``C`` equal chunks (C = 1, or the pipeline microbatches), each
    deduplicated on its own; every field has the chunks (or the rows) on dim 0, so chunking the
    batch on dim 0 chunks the plan with it.
    """

    unique_ids: Any  # [C, U] sorted flat row ids per chunk (grouped by owner), 0-padded
    send_counts: Any  # [C, P] ids each chunk sends to each owner; stays on the host
    inverse: Any  # [B, T, K] position of every lookup in its chunk's unique_ids
    # set by ``exchange_lookup_counts`` before the forward, on the host (None: not yet):
    recv_counts: Any = None  # [C, P] ids each rank asks this one for, per chunk
    rounds: Any = None  # [C, P] offloaded shards: every rank's prefetch round of the lookup

    def to_torch(self) -> ShardPlan:
        return type(self)(  # subclasses keep their class (and so their own ``to``)
            torch.as_tensor(self.unique_ids),
            host_side(torch.as_tensor(self.send_counts)),
            torch.as_tensor(self.inverse),
        )

    def pin_memory(self) -> ShardPlan:
        return replace(
            self, unique_ids=self.unique_ids.pin_memory(), inverse=self.inverse.pin_memory()
        )

    def to(self, device, non_blocking: bool = False) -> ShardPlan:
        return replace(  # the counts are read on the host: no synchronisation to learn splits
            self,
            unique_ids=self.unique_ids.to(device, non_blocking=non_blocking),
            inverse=self.inverse.to(device, non_blocking=non_blocking),
        )


# the pipeline schedule chunks plans into microbatches like any tensor argument
pytree.register_dataclass(ShardPlan)


def build_shard_plan(flat_ids: np.ndarray, bounds: list[int], num_chunks: int = 1) -> ShardPlan:
    """Deduplicate each row chunk's flat row ids and count them per owner (pure numpy)."""
    unique, counts, inverse = unique_per_chunk(flat_ids, num_chunks)
    ends = np.asarray(bounds[1:])
    per_owner = [
        np.bincount(np.searchsorted(ends, unique[i, :count], side="right"), minlength=len(ends))
        for i, count in enumerate(counts)
    ]
    return ShardPlan(unique, np.stack(per_owner).astype(np.int64), inverse)


@dataclass
class ShardPlanner:
    """The loader-side planner of a row-sharded table: picklable, pure numpy."""

    offsets: np.ndarray  # [K] head offsets of the layer's flat table
    bounds: list[int]  # [P + 1] shard boundaries

    def __call__(self, hash_ids: np.ndarray, num_chunks: int = 1) -> ShardPlan:
        return build_shard_plan(hash_ids + self.offsets, self.bounds, num_chunks)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ShardedEngramTable(nn.Module):
    """The local row shard of one Engram layer's table, with the ``EngramTable`` interface.

    Args:
        table_sizes: prime size of every head (order-major), as ``EngramTable``.
        offsets: head offsets in the flat table (``data.ngram_hash.head_offsets``).
        head_dim: Dh.
        group: the table-parallel process group (any backend).
        cpu_group: a gloo group over the same ranks, for the host-side count exchange.
        grad_scale: multiplies the gradient that reaches the owners (1 / data-parallel degree, so a
            table update equals the data-parallel average).
        init_rows: ``fn(weight, first_row)`` that initialises rows deterministically and
            independently of the sharding (``models.tables.table.init_table_rows``).
    """

    def __init__(
        self,
        table_sizes: list[int],
        offsets: np.ndarray,
        head_dim: int,
        group,
        cpu_group,
        grad_scale: float,
        init_rows,
        device=None,
    ):
        super().__init__()
        self.table_sizes = [int(s) for s in table_sizes]
        self.head_dim, self.group, self.cpu_group = head_dim, group, cpu_group
        self.grad_scale, self.init_rows = grad_scale, init_rows
        self.sparse = True
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_rows = sum(self.table_sizes)
        self.bounds = row_bounds(self.num_rows, self.world)
        self.row_start = self.bounds[self.rank]
        local = self.bounds[self.rank + 1] - self.row_start
        self.offsets_np = np.asarray(offsets, dtype=np.int64)
        self.register_buffer(
            "offsets", torch.from_numpy(self.offsets_np).to(device), persistent=False
        )
        self.weight = nn.Parameter(torch.empty(local, head_dim, device=device))
        self.sharded = True
        register_row_sharding(self, ["weight"], group, self.num_rows, self.row_start)

    def planner(self) -> ShardPlanner:
        """What the loader runs to plan this table's lookups (``data.batch``)."""
        return ShardPlanner(self.offsets_np, self.bounds)

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        """Host integers ``send [P, M]`` (row j: what this rank tells rank j) -> ``[P, M]`` (row
        i: what rank i told this one): one all-to-all over the CPU group. The simulator
        (``pretrain.simulation.simulate``) swaps in symmetric traffic, since a fake process group
        moves no values."""
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.cpu_group)
        return recv

    def count_columns(self, plan: ShardPlan) -> torch.Tensor:
        """What this rank tells every owner before ``plan``'s lookups: ``[P, C]`` counts."""
        return torch.as_tensor(plan.send_counts).T

    def with_counts(self, plan: ShardPlan, received: torch.Tensor) -> ShardPlan:
        """``plan`` with what every rank told this one (``received [P, C]``)."""
        return replace(plan, recv_counts=host_side(received.T.contiguous()))

    def flat_ids(self, hash_ids: torch.Tensor) -> torch.Tensor:
        return hash_ids + self.offsets

    def forward(self, hash_ids: torch.Tensor, plan: ShardPlan | None = None) -> torch.Tensor:
        """``hash_ids [B, T, K]`` -> rows ``[B, T, K, Dh]``, routed by the loader's ``plan``."""
        from torch.distributed.nn.functional import all_to_all_single

        if plan is None:
            raise ValueError(
                "a row-sharded Engram table needs the lookup plan of its planner: build the "
                "loader with planners={layer: table.planner()} (data.batch.plan_lookups)"
            )
        if plan.unique_ids.shape[0] != 1:
            raise ValueError(
                f"the lookup plan covers {plan.unique_ids.shape[0]} row chunks but reached one "
                "lookup: plan with num_chunks equal to the pipeline microbatches"
            )
        send = plan.send_counts.tolist()[0]  # host counts: no device synchronisation
        recv, requested = self._route(plan.unique_ids[0, : sum(send)], send, plan)
        local_rows = _ScaleGrad.apply(self._lookup_local(requested), self.grad_scale)
        rows = local_rows.new_empty(sum(send), self.head_dim)
        rows = all_to_all_single(rows, local_rows, send, recv, group=self.group)
        return rows[torch.as_tensor(plan.inverse, device=rows.device)]

    def _received(self, send: list[int], plan: ShardPlan) -> list[int]:
        """How many ids every rank asks this one for: exchanged for the whole batch before the
        forward (``exchange_lookup_counts``), or here (a lookup outside a training step)."""
        if plan.recv_counts is not None:
            return plan.recv_counts.tolist()[0]
        return self.exchange_counts(torch.tensor(send, dtype=torch.int64)[:, None])[:, 0].tolist()

    def _route(self, unique, send: list[int], plan: ShardPlan) -> tuple[list[int], torch.Tensor]:
        """Send this rank's ``unique`` row ids (``send[j]`` to owner j); returns how many every
        rank asks this one for and the ids it asks for, in rank order."""
        recv = self._received(send, plan)
        unique = torch.as_tensor(unique, device=self.weight.device)
        requested = unique.new_empty(sum(recv))
        dist.all_to_all_single(requested, unique, recv, send, group=self.group)
        return recv, requested

    def _lookup_local(self, requested: torch.Tensor) -> torch.Tensor:
        """The owned rows of global ids ``requested`` ``[N]`` -> ``[N, Dh]``."""
        return F.embedding(requested - self.row_start, self.weight, sparse=True)

    @torch.no_grad()
    def init_weights(self) -> None:
        self.offsets.copy_(torch.from_numpy(self.offsets_np))
        self.init_rows(self.weight, self.row_start)


def exchange_lookup_counts(model: nn.Module, batch: Batch) -> Batch:
    """One exchange of host split counts for every row-sharded table's lookups of ``batch``
    (all layers, all pipeline chunks), instead of one per lookup and per recompute. Every rank of
    the tables' group calls it at the same point (the step does, before the forward); it returns
    the batch with each plan holding what the other ranks will ask this one for."""
    planned = [
        (e.layer_id, e.table, batch.engram[e.layer_id])
        for e in model.engram_layers()
        if isinstance(e.table, ShardedEngramTable)
        and e.layer_id in batch.engram
        and batch.engram[e.layer_id].plan is not None
        and batch.engram[e.layer_id].plan.recv_counts is None
    ]
    engram = dict(batch.engram)
    groups: dict[int, list] = {}  # one exchange per table group (one group in every layout)
    for entry in planned:
        groups.setdefault(id(entry[1].cpu_group), []).append(entry)
    for group in groups.values():
        columns = [table.count_columns(inputs.plan) for _, table, inputs in group]
        received = group[0][1].exchange_counts(torch.cat(columns, dim=1))
        start = 0
        for (layer, table, inputs), sent in zip(group, columns, strict=True):
            part = received[:, start : start + sent.shape[1]]
            start += sent.shape[1]
            plan = table.with_counts(inputs.plan, part)
            engram[layer] = EngramInputs(inputs.hash_ids, plan, inputs.rows)
    return replace(batch, engram=engram)
