"""Engram table access behind one interface.

``EngramTable`` is the in-memory flat table (one per Engram layer, per-head offsets). Host-resident,
tiered (hot-row cache / NVMe) and row-sharded tables implement the same two calls,
``forward(hash_ids)``
and ``lookup_flat(flat_ids)``, so the Engram module never knows where rows live.

Legend: B batch, T sequence, K heads, Dh head dim, R total rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        self.register_buffer("offsets", self._offsets(), persistent=False)
        self.weight = nn.Parameter(torch.empty(sum(self.table_sizes), head_dim))

    def _offsets(self) -> torch.Tensor:
        sizes = torch.tensor([0] + self.table_sizes[:-1], dtype=torch.long)
        return sizes.cumsum(0)

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def flat_ids(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """Per-head ids ``[B, T, K]`` -> flat row ids ``[B, T, K]``."""
        return hash_ids + self.offsets

    def lookup_flat(self, flat_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(flat_ids, self.weight, sparse=self.sparse)

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        return self.lookup_flat(self.flat_ids(hash_ids))  # [B, T, K] -> [B, T, K, Dh]

    @torch.no_grad()
    def init_weights(self, std: float = 1.0) -> None:
        # non-persistent buffer: recompute after a meta-device build + to_empty()
        self.offsets.copy_(self._offsets())
        # nn.Embedding's default N(0, 1), as in the reference
        nn.init.normal_(self.weight, std=std)
