"""Manifold-constrained hyper-connections (mHC): G residual streams with learned mixing.

Follows DeepSeek's "mHC: Manifold-Constrained Hyper-Connections" (2025), built on Zhu et al.,
"Hyper-Connections" (2024): each sublayer reads a weighted mix of the streams (pre), writes its
output back with per-stream weights (post), and the streams are mixed by a doubly stochastic matrix
(res), projected with Sinkhorn-Knopp. Weights are static plus a small input-dependent part. With G =
1 the module is exactly a plain residual, ``x + f(x)``.

Legend: B batch, T sequence, G streams (hc_mult), D dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.sharded_init import normal_


def sinkhorn(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Project ``exp(logits) [..., G, G]`` onto doubly stochastic matrices (log-space Sinkhorn)."""
    log_m = logits.float()
    for _ in range(num_iters):
        log_m = log_m - log_m.logsumexp(dim=-1, keepdim=True)
        log_m = log_m - log_m.logsumexp(dim=-2, keepdim=True)
    return log_m.exp().type_as(logits)


class HyperConnection(nn.Module):
    """Residual wiring of one sublayer over G streams."""

    def __init__(self, dim: int, hc_mult: int, sinkhorn_iters: int = 20, eps: float = 1e-6):
        super().__init__()
        self.hc_mult, self.sinkhorn_iters, self.eps = hc_mult, sinkhorn_iters, eps
        if hc_mult == 1:
            return
        g = hc_mult
        self.proj = nn.Linear(g * dim, 2 * g + g * g, bias=False)  # dynamic pre, post, res
        self.static_pre = nn.Parameter(torch.empty(g))
        self.static_post = nn.Parameter(torch.empty(g))
        self.static_res = nn.Parameter(torch.empty(g, g))
        self.alpha = nn.Parameter(torch.empty(3))
        # fixed prior that starts the mixing close to the identity; static_res learns an offset
        self.register_buffer("res_prior", torch.empty(g, g), persistent=False)

    def pre(self, x: torch.Tensor):
        """``x [B, T, G, D]`` -> ``(sublayer input [B, T, D], ctx)``."""
        if self.hc_mult == 1:
            return x[:, :, 0], None
        g = self.hc_mult
        z = F.rms_norm(x.flatten(2), (x.shape[2] * x.shape[3],), eps=self.eps)
        dyn = self.proj(z)  # [B, T, G*D] -> [B, T, 2G + G*G]
        pre = torch.sigmoid(self.alpha[0] * dyn[..., :g] + self.static_pre)
        post = 2 * torch.sigmoid(self.alpha[1] * dyn[..., g : 2 * g] + self.static_post)
        res_logits = self.alpha[2] * dyn[..., 2 * g :].unflatten(-1, (g, g))
        res_logits = res_logits + self.static_res + self.res_prior
        res = sinkhorn(res_logits, self.sinkhorn_iters)  # [B, T, G, G]
        return torch.einsum("btg,btgd->btd", pre, x), (post, res)

    def post(self, x: torch.Tensor, out: torch.Tensor, ctx) -> torch.Tensor:
        """Mix the streams and add the sublayer output ``out [B, T, D]``."""
        if self.hc_mult == 1:
            return x + out.unsqueeze(2)
        post, res = ctx
        return torch.einsum("btgh,bthd->btgd", res, x) + post.unsqueeze(-1) * out.unsqueeze(2)

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.hc_mult == 1:
            return
        g = self.hc_mult
        normal_(self.proj.weight, std=0.02)
        self.static_pre.fill_(-torch.log(torch.tensor(g - 1.0)).item())  # sigmoid = 1/G
        self.static_post.zero_()  # 2*sigmoid(0) = 1
        self.static_res.zero_()
        self.alpha.fill_(0.01)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The non-persistent prior (not in a state dict: recomputed after a load)."""
        if self.hc_mult == 1:
            return
        eye = torch.eye(self.hc_mult, dtype=torch.bool, device=self.res_prior.device)
        self.res_prior.copy_(torch.where(eye, 0.0, -8.0))


class StreamMerge(nn.Module):
    """Final reduction of the G streams to one hidden state (a learned, input-dependent mix)."""

    def __init__(self, dim: int, hc_mult: int, eps: float = 1e-6):
        super().__init__()
        self.hc_mult, self.eps = hc_mult, eps
        if hc_mult > 1:
            self.proj = nn.Linear(hc_mult * dim, hc_mult, bias=False)
            self.static = nn.Parameter(torch.empty(hc_mult))
            self.alpha = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hc_mult == 1:
            return x[:, :, 0]
        z = F.rms_norm(x.flatten(2), (x.shape[2] * x.shape[3],), eps=self.eps)
        weights = torch.sigmoid(self.alpha * self.proj(z) + self.static)  # [B, T, G]
        return torch.einsum("btg,btgd->btd", weights, x)

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.hc_mult > 1:
            normal_(self.proj.weight, std=0.02)
            self.static.fill_(-torch.log(torch.tensor(self.hc_mult - 1.0)).item())
            self.alpha.fill_(0.01)
