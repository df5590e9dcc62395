"""Engram table access behind one interface.

``EngramTable`` is the in-memory flat table (one per Engram layer, per-head offsets). Host-resident,
tiered (hot-row cache / NVMe) and row-sharded tables implement the same calls,
``forward(hash_ids, plan)`` and ``planner()`` (a picklable callable the loader runs to make
``plan``; None when the table needs no plan), so the Engram module never knows where rows live.

Legend: B batch, T sequence, K heads, Dh head dim, R total rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data.ngram_hash import head_offsets
from models.sharded_init import local_rows


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

    def _offsets(self) -> torch.Tensor:
        return torch.from_numpy(self.offsets_np.copy())

    def planner(self):
        """In-memory lookups need no host plan."""
        return None

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

    def forward(self, hash_ids: torch.Tensor, plan=None) -> torch.Tensor:
        return self.lookup_flat(self.flat_ids(hash_ids))  # [B, T, K] -> [B, T, K, Dh]

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
