"""Attention: GQA and DeepSeek-V3 MLA, through flex_attention block masks (CUDA) or SDPA.

MLA follows DeepSeek-V2/V3 ("DeepSeek-V2: A Strong, Economical, and Efficient MoE Language Model",
2024): low-rank query and key/value compression and a decoupled RoPE key shared by all heads.

Legend: B batch, T sequence, H heads, Hkv kv heads, Dq qk head dim, Dv value head dim, D model dim.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.args import ModelArgs
from models.layers import AttentionMask, RMSNorm, apply_rotary, yarn_mscale
from models.sharded_init import trunc_normal_

if TYPE_CHECKING:
    from models.kv_cache import LayerCache


def attend(q, k, v, mask: AttentionMask | None, scale: float) -> torch.Tensor:
    """q ``[B, T, H, Dq]``, k ``[B, T, Hkv, Dq]``, v ``[B, T, Hkv, Dv]`` -> ``[B, T, H, Dv]``.

    A block mask runs flex_attention (compiled on CUDA; grouped kv heads are read in place),
    otherwise SDPA with the dense mask, or causal when there is none (``mask=None`` too). A mask
    with a ``sequence`` (context parallelism) attends the local queries to the keys and values
    of the whole sequence, gathered from every rank.
    """
    mask = mask or AttentionMask()
    if mask.sequence is not None:  # context parallelism: keys and values of the whole sequence
        k, v = mask.sequence.gather(k, dim=1), mask.sequence.gather(v, dim=1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if mask.block is not None:
        out = _flex(q.device)(
            q, k, v, block_mask=mask.block, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    else:
        repeat = q.shape[1] // k.shape[1]
        if repeat > 1:  # [B, Hkv, T, D] -> [B, H, T, D]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.dense, is_causal=mask.dense is None, scale=scale
        )
    return out.transpose(1, 2)


_COMPILED_FLEX = None


def _flex(device: torch.device):
    """flex_attention, compiled once per process on CUDA (eager elsewhere: forward only)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


class GQAttention(nn.Module):
    """Grouped-query attention with RoPE."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
        )
        self.wq = nn.Linear(args.dim, args.num_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.num_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.num_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.num_heads * args.head_dim, args.dim, bias=False)
        self.scale = args.head_dim**-0.5 * yarn_mscale(args.yarn.factor, args.yarn.mscale) ** 2

    def forward(self, x, rope, mask, cache: LayerCache | None = None):
        """``cache``: this layer's decoding state; the new positions attend to the cached ones
        too (their mask comes from ``KVCache.attention_mask``)."""
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)  # [B, T, H*Dq] -> [B, T, H, Dq]
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.extend(k, v)  # [B, P+T, Hkv, Dq]
        return self.wo(attend(q, k, v, mask, self.scale).flatten(2))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            trunc_normal_(linear.weight, std=std)
        trunc_normal_(self.wo.weight, std=out_std)


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V3)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = (
            args.qk_nope_head_dim,
            args.qk_rope_head_dim,
            args.v_head_dim,
        )
        self.kv_lora_rank = args.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        if args.q_lora_rank > 0:
            self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(args.q_lora_rank, eps=args.norm_eps)
            self.wq_b = nn.Linear(args.q_lora_rank, args.num_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(args.dim, args.num_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, args.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank, eps=args.norm_eps)
        self.wkv_b = nn.Linear(
            args.kv_lora_rank, args.num_heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.wo = nn.Linear(args.num_heads * self.v_dim, args.dim, bias=False)
        # the decoupled rope key is shared by all heads: a seam where tensor parallelism sums the
        # gradients of the heads held on other ranks
        self.rope_key = nn.Identity()
        mscale = yarn_mscale(args.yarn.factor, args.yarn.mscale_all_dim or args.yarn.mscale)
        self.scale = qk_dim**-0.5 * mscale**2

    def forward(self, x, rope, mask, cache: LayerCache | None = None):
        """``cache``: this layer's decoding state, which keeps the normed latent and the rotated
        rope key of earlier positions (the compressed form MLA exists for)."""
        batch, seq, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        # -1 heads: a tensor-parallel rank holds only its heads
        q = q.view(batch, seq, -1, self.nope_dim + self.rope_dim)  # [B, T, H*Dq] -> [B, T, H, Dq]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rotary(q_pe, *rope)
        latent, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = self.rope_key(apply_rotary(k_pe.unsqueeze(2), *rope))  # [B, T, 1, Dr]: all heads
        latent = self.kv_norm(latent)
        if cache is not None:
            latent, k_pe = cache.extend(latent, k_pe)  # [B, P+T, rank], [B, P+T, 1, Dr]
        # [B, S, H*(Dn+Dv)] -> [B, S, H, Dn+Dv]
        kv = self.wkv_b(latent).view(batch, latent.shape[1], -1, self.nope_dim + self.v_dim)
        if mask is not None and mask.sequence is not None:
            kv, k_pe, mask = _gather_mla_keys(kv, k_pe, mask)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, q.shape[2], -1)], dim=-1)
        return self.wo(attend(q, k, v, mask, self.scale).flatten(2))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        linears = [self.wkv_a, self.wkv_b]
        linears += [self.wq_a, self.wq_b] if hasattr(self, "wq_a") else [self.wq]
        for linear in linears:
            trunc_normal_(linear.weight, std=std)
        trunc_normal_(self.wo.weight, std=out_std)
        self.kv_norm.reset_parameters()
        if hasattr(self, "q_norm"):
            self.q_norm.reset_parameters()


def _gather_mla_keys(kv: torch.Tensor, k_pe: torch.Tensor, mask: AttentionMask):
    """Context parallelism for MLA: one all-gather of the heads' ``[k_nope | v]`` and the shared
    rope key before it is copied to every head (a fifth less traffic than gathering the
    expanded keys at 128 heads); the mask then needs no further gather.
    ``kv [B, L, H, Dn+Dv]``, ``k_pe [B, L, 1, Dr]`` -> the whole sequence's, and the mask."""
    heads, width = kv.shape[2], kv.shape[3]
    packed = torch.cat([kv.flatten(2), k_pe.flatten(2)], dim=-1)  # [B, L, H*(Dn+Dv) + Dr]
    packed = mask.sequence.gather(packed, dim=1)  # [B, T, ...] in sequence order
    kv, k_pe = packed.split([heads * width, k_pe.shape[-1]], dim=-1)
    kv = kv.unflatten(-1, (heads, width))  # [B, T, H*(Dn+Dv)] -> [B, T, H, Dn+Dv]
    return kv, k_pe.unsqueeze(2), replace(mask, sequence=None)


def build_attention(args: ModelArgs) -> nn.Module:
    return MLAttention(args) if args.attention == "mla" else GQAttention(args)
