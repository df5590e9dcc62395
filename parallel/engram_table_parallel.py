"""Engram-table parallelism: each Engram layer's flat table is row-sharded over its own group.

Lookup: every rank deduplicates the rows its batch touches, sends the ids to their owners with an
all-to-all, and the owners send the rows back; gradients return to the owners the same way (the
all-to-all is autograd-aware), where they arrive as sparse row gradients for the row-wise optimizer.

Split sizes come from the host: ``build_shard_plan`` runs on numpy hash ids (in the loader's
workers),
and the per-owner counts are exchanged over a CPU (gloo) group, so the device never has to be
synchronised to learn them (the public Megatron-based port pays a device-to-host sync here).

Rows are partitioned in contiguous blocks with ``torch.chunk`` semantics (``ceil(R / P)`` rows per
shard, the last ones possibly shorter), the same as a ``Shard(0)`` DTensor, so checkpoints reshard
(``parallel.sharding``).

Legend: B batch, T sequence, K heads, Dh head dim, U unique rows of the local batch, P group size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.sharding import register_row_sharding


def row_bounds(num_rows: int, num_shards: int) -> list[int]:
    """Shard boundaries ``[P + 1]`` with ``torch.chunk`` semantics."""
    size = -(-num_rows // num_shards)
    return [min(i * size, num_rows) for i in range(num_shards + 1)]


@dataclass
class ShardPlan:
    """Host-side routing of one layer's lookups for one batch."""

    unique_ids: np.ndarray  # [U] sorted flat row ids (sorted ids are grouped by owner)
    send_counts: np.ndarray  # [P] ids sent to each owner
    inverse: np.ndarray  # [B, T, K] position of every lookup in unique_ids


def build_shard_plan(flat_ids: np.ndarray, bounds: list[int]) -> ShardPlan:
    """Deduplicate the batch's flat row ids and count them per owner (pure numpy)."""
    unique, inverse = np.unique(flat_ids, return_inverse=True)
    owners = np.searchsorted(np.asarray(bounds[1:]), unique, side="right")
    counts = np.bincount(owners, minlength=len(bounds) - 1)
    return ShardPlan(
        unique.astype(np.int64),
        counts.astype(np.int64),
        inverse.reshape(flat_ids.shape).astype(np.int64),
    )


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
        head_dim: Dh.
        group: the table-parallel process group (any backend).
        cpu_group: a gloo group over the same ranks, for the host-side count exchange.
        grad_scale: multiplies the gradient that reaches the owners (1 / data-parallel degree, so a
            table update equals the data-parallel average).
        init_rows: ``fn(weight, first_row)`` that initialises rows deterministically and
            independently of the sharding (``models.engram_table.init_table_rows``).
    """

    def __init__(
        self,
        table_sizes: list[int],
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
        offsets = np.concatenate([[0], np.cumsum(self.table_sizes)[:-1]]).astype(np.int64)
        self.offsets_np = offsets
        self.register_buffer("offsets", torch.from_numpy(offsets).to(device), persistent=False)
        self.weight = nn.Parameter(torch.empty(local, head_dim, device=device))
        self.sharded = True
        register_row_sharding(self, ["weight"], group, self.num_rows, self.row_start)

    def table_layout(self) -> tuple[np.ndarray, list[int]]:
        """(head offsets, shard bounds): what the loader needs to build ``ShardPlan``s."""
        return self.offsets_np, self.bounds

    def flat_ids(self, hash_ids: torch.Tensor) -> torch.Tensor:
        return hash_ids + self.offsets

    def plan_for(self, hash_ids: torch.Tensor) -> ShardPlan:
        """Host plan from device ids (costs a device-to-host copy: the loader's plan avoids it)."""
        flat = hash_ids.detach().cpu().numpy() + self.offsets_np
        return build_shard_plan(flat, self.bounds)

    def forward(self, hash_ids: torch.Tensor, plan: ShardPlan | None = None) -> torch.Tensor:
        """``hash_ids [B, T, K]`` -> rows ``[B, T, K, Dh]``."""
        from torch.distributed.nn.functional import all_to_all_single

        plan = plan if plan is not None else self.plan_for(hash_ids)
        device = self.weight.device
        send = [int(c) for c in plan.send_counts]
        recv_t = torch.empty(self.world, dtype=torch.int64)
        dist.all_to_all_single(
            recv_t, torch.as_tensor(plan.send_counts, dtype=torch.int64), group=self.cpu_group
        )
        recv = recv_t.tolist()  # a CPU tensor: no device synchronisation
        unique = torch.as_tensor(plan.unique_ids, device=device)
        requested = unique.new_empty(sum(recv))
        dist.all_to_all_single(requested, unique, recv, send, group=self.group)
        local_rows = F.embedding(requested - self.row_start, self.weight, sparse=True)
        local_rows = _ScaleGrad.apply(local_rows, self.grad_scale)
        rows = local_rows.new_empty(len(plan.unique_ids), self.head_dim)
        rows = all_to_all_single(rows, local_rows, send, recv, group=self.group)
        return rows[torch.as_tensor(plan.inverse, device=device)]

    @torch.no_grad()
    def init_weights(self) -> None:
        self.offsets.copy_(torch.from_numpy(self.offsets_np))
        self.init_rows(self.weight, self.row_start)
