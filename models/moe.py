"""Fine-grained MoE with shared experts: router -> dispatcher -> experts -> combine,
so that the local and the all-to-all dispatcher swap without touching the model.

Routing and auxiliary-loss-free balancing follow DeepSeek-V3 ("DeepSeek-V3 Technical Report", 2024):
sigmoid affinities, a per-expert bias that only affects selection and is nudged toward balanced load
after every step, and an optional sequence-level balance loss. The dispatcher is an interface; the
local one lives here, the all-to-all one in ``parallel/``.

Legend: N tokens, E routed experts, K top-k, D dim, F expert hidden dim, M = N*K routed token
copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.args import MoEArgs
from models.layers import FeedForward
from models.sequence import LOCAL_SEQUENCE
from models.sharded_init import local_rows, trunc_normal_


class Router(nn.Module):
    """Top-k router with a selection bias for auxiliary-loss-free load balancing."""

    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(dim, args.num_routed_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(args.num_routed_experts))
        # tokens routed to each expert since the last bias update; reset by update_bias()
        self.register_buffer(
            "tokens_per_expert", torch.zeros(args.num_routed_experts), persistent=False
        )

    def forward(self, x: torch.Tensor):
        """``x [N, D]`` -> ``(topk_idx [N, K], topk_weight [N, K], scores [N, E])``."""
        logits = self.gate(x).float()
        scores = logits.sigmoid() if self.args.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.expert_bias
        if self.args.n_group > 1:
            choice = self._group_limited(choice)
        topk_idx = choice.topk(self.args.top_k, dim=-1).indices
        weights = scores.gather(1, topk_idx)
        if self.args.normalize_weights and self.args.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # as DeepSeek-V3
        if self.training:  # evaluation must not move the balancing bias of the next step
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(topk_idx, scores.shape[1])
        return topk_idx, (weights * self.args.route_scale).type_as(x), scores

    def _group_limited(self, choice: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's group-limited routing: ``choice [N, E]`` with the experts of all but
        the ``topk_group`` groups of best two-expert sums masked out (-inf)."""
        grouped = choice.unflatten(-1, (self.args.n_group, -1))  # [N, n_group, E / n_group]
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        kept = group_score.topk(self.args.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor | None = None) -> None:
        """``bias += speed * sign(mean load - load)``; pass DP-summed loads when data parallel."""
        load = self.tokens_per_expert if tokens_per_expert is None else tokens_per_expert
        if self.args.bias_update_speed > 0:  # no host sync: an empty load moves nothing
            step = self.args.bias_update_speed * torch.sign(load.mean() - load)
            self.expert_bias += step * (load.sum() > 0)
        self.tokens_per_expert.zero_()

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        trunc_normal_(self.gate.weight, std=std)
        self.expert_bias.zero_()
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The non-persistent load counts (the bias is a weight: it is saved)."""
        self.tokens_per_expert.zero_()


def expert_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed copies per expert ``[E]`` (int64). ``scatter_add_`` into a fixed size, unlike
    ``bincount``, does not read the ids back to the host on CUDA."""
    flat = topk_idx.flatten()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


@dataclass
class DispatchContext:
    token_index: torch.Tensor  # [M] source token of every routed copy, in expert order
    order: torch.Tensor  # [M] permutation from (token, k) order to expert order


class LocalDispatcher:
    """Permutes token copies into expert order on one rank (no communication)."""

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
        """``x [N, D]`` -> ``(x_sorted [M, D], tokens_per_expert [E], ctx)``."""
        flat = topk_idx.flatten()
        order = flat.argsort(stable=True)
        token_index = order // topk_idx.shape[1]
        counts = expert_counts(flat, num_experts)
        return x[token_index], counts, DispatchContext(token_index, order)

    def combine(
        self, y: torch.Tensor, topk_weight: torch.Tensor, ctx: DispatchContext, num_tokens: int
    ):
        """Weighted sum of expert outputs ``y [M, D]`` back to ``[N, D]``."""
        weighted = y * topk_weight.flatten()[ctx.order].unsqueeze(1)
        # summed in the weights' dtype (float32 when the experts ran in bf16 on fp32 inputs)
        out = torch.zeros(num_tokens, y.shape[1], dtype=weighted.dtype, device=y.device)
        return out.index_add_(0, ctx.token_index, weighted)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for ``x``'s device, else ``x``'s own. Autocast does
    not cover ``grouped_mm``, and on CUDA it keeps ``rms_norm`` (the experts' input) in float32, so
    the experts cast both activations and weights to this themselves."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor, *dims: int) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned strides; fall back otherwise. Compiled, its
    shape function takes BF16 only (the eager CPU kernel also runs float32)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    return all(d * x.element_size() % 16 == 0 for d in dims)


def padded_groups(
    tokens_per_expert: torch.Tensor, multiple: int, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of ``rows`` expert-ordered rows goes when every expert's group starts at a
    multiple of ``multiple`` (zero rows fill the gaps), and the padded groups' end offsets
    (int32), computed on the device without a host read. The counts themselves (the router's
    loads) are not changed."""
    counts = tokens_per_expert.long()
    padded = (counts + multiple - 1) // multiple * multiple
    expert = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), counts, output_size=rows
    )
    within = torch.arange(rows, device=counts.device) - (counts.cumsum(0) - counts)[expert]
    destination = (padded.cumsum(0) - padded)[expert] + within
    return destination, padded.cumsum(0).to(torch.int32)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as ``[E, D, F]`` / ``[E, F, D]`` weights (shardable on the ep
    axis)."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        use_grouped_mm: bool = True,
        first_expert: int = 0,
    ):
        super().__init__()
        self.num_experts, self.use_grouped_mm = num_experts, use_grouped_mm
        self.first_expert = first_expert  # global index of expert 0 here (expert parallelism)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        # FP8 grouped GEMMs (models.quantize): each expert's rows padded to a multiple of this,
        # the weights handed over column-major, as torchao's scaled grouped GEMM needs them
        self.group_multiple = 1
        # re-applies a converter to a replacement of this module (expert parallelism's shard)
        self.reconvert = None

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [M, D]`` in expert order, ``tokens_per_expert [E]`` -> ``[M, D]``."""
        dim, hidden = self.w1.shape[1], self.w1.shape[2]
        x = x.to(compute_dtype(x))
        if self.use_grouped_mm and grouped_mm_supported(x, dim, hidden):
            weights = [w.to(x.dtype) for w in (self.w1, self.w3, self.w2)]
            if self.group_multiple == 1:
                return self._grouped(x, tokens_per_expert.cumsum(0).to(torch.int32), *weights)
            weights = [w.transpose(-2, -1).contiguous().transpose(-2, -1) for w in weights]
            rows, offs = padded_groups(tokens_per_expert, self.group_multiple, x.shape[0])
            padded = x.new_zeros(x.shape[0] + self.num_experts * (self.group_multiple - 1), dim)
            out = self._grouped(padded.index_copy(0, rows, x), offs, *weights)
            return out.index_select(0, rows)
        return self.forward_loop(x, tokens_per_expert)

    @staticmethod
    def _grouped(x, offs, w1, w3, w2) -> torch.Tensor:
        h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
        return _ContiguousGrad.apply(torch._grouped_mm(h, w2, offs=offs))

    def forward_loop(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Per-expert matmuls: the fallback when grouped_mm cannot run (one host read)."""
        outs = []
        x = x.to(compute_dtype(x))
        w1, w3, w2 = (w.to(x.dtype) for w in (self.w1, self.w3, self.w2))
        for e, chunk in enumerate(x.split(tokens_per_expert.tolist())):
            outs.append((F.silu(chunk @ w1[e]) * (chunk @ w3[e])) @ w2[e])
        return torch.cat(outs) if outs else x.new_zeros(0, self.w2.shape[2])

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        # one generator per global expert: the init does not depend on how experts are sharded
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        views = [
            (*local_rows(w), scale)
            for w, scale in ((self.w1, std), (self.w3, std), (self.w2, out_std))
        ]
        first = self.first_expert + views[0][1]
        for local in range(views[0][0].shape[0]):
            gen = torch.Generator().manual_seed(base * 1_000_003 + first + local)
            for weight, _, scale in views:
                value = torch.empty(weight.shape[1:])
                nn.init.trunc_normal_(value, std=scale, a=-2 * scale, b=2 * scale, generator=gen)
                weight[local].copy_(value)


class MoE(nn.Module):
    """Shared experts plus top-k routed experts."""

    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        self.args = args
        self.router = Router(dim, args)
        self.experts = GroupedExperts(
            dim, args.expert_hidden_dim, args.num_routed_experts, args.use_grouped_mm
        )
        self.shared_experts = (
            FeedForward(dim, args.expert_hidden_dim * args.num_shared_experts)
            if args.num_shared_experts > 0
            else None
        )
        self.dispatcher = LocalDispatcher()
        self.sequence = LOCAL_SEQUENCE  # context parallelism: the sequence's other chunks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, T, D]`` -> ``(out [B, T, D], seq_aux_loss or None)``."""
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        topk_idx, topk_weight, scores = self.router(flat)
        # tokens travel in the compute dtype: bf16 under autocast, where CUDA's rms_norm hands
        # over float32 (half the all-to-all bytes)
        routed, counts, ctx = self.dispatcher.dispatch(
            flat.to(compute_dtype(flat)), topk_idx, self.args.num_routed_experts
        )
        out = self.dispatcher.combine(self.experts(routed, counts), topk_weight, ctx, flat.shape[0])
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        aux = None
        if self.training and self.args.seq_aux_loss_coef > 0:
            aux = self.seq_aux_loss(topk_idx.view(batch, seq, -1), scores.view(batch, seq, -1))
        return out.view(batch, seq, dim), aux

    def seq_aux_loss(self, topk_idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's complementary sequence-wise balance loss, averaged over sequences."""
        batch, seq, experts = scores.shape
        counts = torch.zeros(batch, experts, device=scores.device).scatter_add_(
            1, topk_idx.flatten(1), torch.ones(batch, topk_idx[0].numel(), device=scores.device)
        )
        # the statistics are the whole sequence's: summed over its context-parallel chunks
        counts = self.sequence.sum(counts.detach())
        seq = seq * self.sequence.degree
        frac = counts * experts / (self.args.top_k * seq)  # f_i
        prob_sum = self.sequence.sum((scores / scores.sum(dim=-1, keepdim=True)).sum(dim=1))
        prob = prob_sum / seq  # P_i
        return self.args.seq_aux_loss_coef * (frac * prob).sum(dim=1).mean()

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
