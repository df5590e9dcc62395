"""Expert parallelism: an all-to-all token dispatcher (uneven splits, autograd) for sharded experts.

Each rank of the ep group owns ``El = ceil(E / ep)`` consecutive expert slots (``torch.chunk``
rows, like a ``Shard(0)`` DTensor); when ``ep`` does not divide E (55 experts over 8 ranks) the
last rank's extra slots are padding that the router never picks (``parallel.sharding`` keeps them
out of checkpoints). ``dispatch`` permutes the local
token copies by expert, exchanges per-expert counts, sends every copy to its expert's owner and
regroups the received copies by local expert; ``combine`` reverses the exchange and sums the
weighted outputs per token. Both all-to-alls are autograd-aware, so gradients return to the
tokens' ranks.

Legend: N local tokens, K top-k, E experts, El = ceil(E / ep) local expert slots, M = N*K copies
sent, R received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single


@dataclass
class A2AContext:
    token_index: torch.Tensor  # [M] source token of every sent copy, in expert order
    order: torch.Tensor  # [M] (token, k) order -> expert order
    send_splits: list[int]  # copies sent to each rank
    recv_splits: list[int]  # copies received from each rank
    regroup: torch.Tensor  # [R] received (rank-major) order -> local-expert-major order


class AllToAllDispatcher:
    """Drop-in for ``models.moe.LocalDispatcher`` when experts are sharded over ``group``."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.world = dist.get_world_size(group)
        self.local_experts = -(-num_experts // self.world)  # slots per rank, padding included
        self.slots = self.local_experts * self.world

    def real_experts(self, ep_rank: int, num_experts: int) -> int:
        """Experts (not padding) held by ``ep_rank``."""
        return max(0, min(self.local_experts, num_experts - ep_rank * self.local_experts))

    def host_splits(self, counts: torch.Tensor, recv_matrix: torch.Tensor):
        """Copies sent to and received from every rank, as host integers: the one host sync of
        a MoE layer (split sizes must be host integers for the collective). The simulator
        (``pretrain.simulation.simulate``) swaps in balanced splits, since fake tensors have no
        values."""
        splits = torch.stack([counts.view(self.world, -1).sum(1), recv_matrix.sum(1)])
        send_splits, recv_splits = splits.tolist()
        return send_splits, recv_splits

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
        flat = topk_idx.flatten()
        order = flat.argsort(stable=True)
        token_index = order // topk_idx.shape[1]
        counts = torch.zeros(self.slots, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))  # [ep * El]; bincount would sync
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [ep * El], rank-major
        recv_matrix = recv_counts.view(self.world, self.local_experts)
        send_splits, recv_splits = self.host_splits(counts, recv_matrix)
        received = x.new_empty(sum(recv_splits), x.shape[1])
        received = all_to_all_single(
            received, x[token_index], recv_splits, send_splits, group=self.group
        )
        regroup = regroup_index(recv_matrix, sum(recv_splits))
        ctx = A2AContext(token_index, order, send_splits, recv_splits, regroup)
        return received[regroup], recv_matrix.sum(0), ctx

    def combine(self, y: torch.Tensor, topk_weight: torch.Tensor, ctx: A2AContext, num_tokens: int):
        back = torch.empty_like(y).index_copy(0, ctx.regroup, y)  # local-expert-major -> rank-major
        returned = y.new_empty(sum(ctx.send_splits), y.shape[1])
        returned = all_to_all_single(
            returned, back, ctx.send_splits, ctx.recv_splits, group=self.group
        )
        weighted = returned * topk_weight.flatten()[ctx.order].unsqueeze(1)
        # summed in the weights' dtype (float32 when the experts ran in bf16 on fp32 inputs)
        out = torch.zeros(num_tokens, y.shape[1], dtype=weighted.dtype, device=y.device)
        return out.index_add_(0, ctx.token_index, weighted)


def regroup_index(recv_matrix: torch.Tensor, total: int) -> torch.Tensor:
    """Index that reorders received copies from (source rank, expert) to (expert, source rank),
    built on the device (``total``: the number of copies, already known on the host)."""
    ranks, experts = recv_matrix.shape
    flat = recv_matrix.flatten()
    src_start = (flat.cumsum(0) - flat).view(ranks, experts).t().flatten()  # in (expert, rank)
    sizes = recv_matrix.t().flatten()  # segment sizes in the output's (expert, rank) order
    segment = torch.repeat_interleave(
        torch.arange(sizes.numel(), device=flat.device), sizes, output_size=total
    )
    out_start = sizes.cumsum(0) - sizes
    position = torch.arange(total, device=flat.device)
    return src_start[segment] + position - out_start[segment]
