"""Context parallelism: one sequence split over the ranks of the ``cp`` mesh axis.

Each row of ``T`` tokens is cut into ``2 * cp`` equal chunks and rank ``r`` holds chunks ``r`` and
``2cp - 1 - r`` ("zigzag", so every rank gets the same share of the causal attention work). The
loader does the split (``data.batch.context_shard``) after hashing the whole row, so Engram's
n-gram ids, positions and document ids are the single-process ones at every position.

``ContextParallelSequence`` is what the model's sequence seams call under context parallelism
(the model's default is ``models.layers.LocalSequence``, the whole sequence on one rank):

- ``gather``: the whole sequence of a tensor, in sequence order (attention's keys and values;
  differentiable: the backward reduce-scatters the gradients back to the owners);
- ``gather_ids``: the same for integer tensors (positions, document ids), without autograd;
- ``halo``: for each local chunk, the ``width`` positions before it (the Engram ShortConv's
  left context), zeros before the first chunk; differentiable;
- ``sum``: a differentiable all-reduce (MoE's per-sequence balance statistics).

The collectives are autograd Functions of our own: a single-tensor all-gather forward and
reduce-scatter backward, which NCCL and gloo both implement.

Legend: B batch, T sequence (whole row), L local chunk length, S local chunks (2), W halo width.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from data.batch import zigzag_index

# the single-tensor collectives (renamed in recent PyTorch; the old names warn there)
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 0 (rank order); backward: reduce-scatter of the summed gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _ALL_GATHER(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        _REDUCE_SCATTER(out, grad.contiguous(), group=ctx.group)
        return out, None


class _SumAll(torch.autograd.Function):
    """All-reduce sum; every rank's gradient is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ContextParallelSequence:
    """This rank's zigzag share of every row, and the collectives over the ``cp`` group.

    Args:
        group: the process group of the ``cp`` mesh axis.
        degree: its size.
        rank: this rank's index in it.
    """

    num_chunks = 2  # local chunks per rank (zigzag)

    def __init__(self, group, degree: int, rank: int):
        self.group, self.degree, self.rank = group, degree, rank
        self._index: dict = {}

    def _indices(self, local_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(global positions of the local tokens ``[L*S]``, the permutation that puts the
        rank-ordered gathered sequence back in sequence order ``[T]``)."""
        key = (local_len, str(device))
        if key not in self._index:
            seq = local_len * self.degree
            held = [zigzag_index(seq, self.degree, r) for r in range(self.degree)]
            gathered_order = torch.from_numpy(np.concatenate(held))
            to_sequence = torch.empty_like(gathered_order)
            to_sequence[gathered_order] = torch.arange(seq)
            mine = torch.from_numpy(held[self.rank])
            self._index[key] = (mine.to(device), to_sequence.to(device))
        return self._index[key]

    def query_index(self, local_len: int, device) -> torch.Tensor:
        """Global sequence index of each local position ``[L*S]``."""
        return self._indices(local_len, device)[0]

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``x [.., L*S, ..]`` on every rank -> the whole sequence ``[.., T, ..]`` in order."""
        _, to_sequence = self._indices(x.shape[dim], x.device)
        moved = x.movedim(dim, 0)
        whole = _GatherSeq.apply(moved, self.group)  # [cp * L*S, ...] in rank order
        return whole.index_select(0, to_sequence).movedim(0, dim)

    @torch.no_grad()
    def gather_ids(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``gather`` for integer tensors (positions, document ids)."""
        return self.gather(x, dim)

    def halo(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """``x [B, L*S, C]`` -> ``[B, S, W, C]``: the ``width`` positions before each local
        chunk (zeros before the sequence start)."""
        batch, local, channels = x.shape
        chunk = local // self.num_chunks
        if chunk < width:
            raise ValueError(
                f"context-parallel chunks of {chunk} tokens are shorter than the Engram "
                f"ShortConv's left context of {width}; raise data.seq_len or lower "
                "parallelism.context_parallel_degree"
            )
        tails = x.view(batch, self.num_chunks, chunk, channels)[:, :, chunk - width :]
        # [B, S, W, C] -> [S, B, W, C] -> gathered [cp * S, B, W, C] (rank r: its chunks)
        gathered = _GatherSeq.apply(tails.transpose(0, 1), self.group)
        by_chunk, mine = self._halo_indices(x.device)
        by_chunk = gathered.index_select(0, by_chunk)  # [2cp, B, W, C] in sequence order
        padded = torch.cat([torch.zeros_like(by_chunk[:1]), by_chunk])  # row c: chunk c-1
        return padded.index_select(0, mine).transpose(0, 1)  # [B, S, W, C]

    def _halo_indices(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the gathered tail of every chunk in sequence order, this rank's two chunk numbers),
        made once per device (no host-to-device copy per step)."""
        key = ("halo", str(device))
        if key not in self._index:
            num_global = self.num_chunks * self.degree
            owner_slot = torch.empty(num_global, dtype=torch.long)
            for r in range(self.degree):
                owner_slot[r] = 2 * r  # chunk r: rank r's first chunk
                owner_slot[num_global - 1 - r] = 2 * r + 1  # chunk 2cp-1-r: its second
            mine = torch.tensor([self.rank, num_global - 1 - self.rank])
            self._index[key] = (owner_slot.to(device), mine.to(device))
        return self._index[key]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over the ``cp`` ranks."""
        return _SumAll.apply(x, self.group)
