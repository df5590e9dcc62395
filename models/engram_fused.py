"""Engram's dense tail as one autograd function: the branches' key and query RMSNorms, the gate
(signed sqrt, sigmoid), the gated value and the ShortConv (RMSNorm, causal dilated taps, SiLU,
residual), with a hand-written backward.

Autograd of the composite (``models.engram.engram_gate`` + ``ShortConv``) records ~270 aten ops
for one layer's forward and backward, each a kernel launch and a trip through memory on a GPU.
Here the forward is ~30 ops and the backward ~60; it saves the normalised keys, queries and
conv inputs (fewer full-size tensors than autograd of the composite keeps), and it is one region
for ``torch.compile`` (dynamo traces autograd functions; inductor fuses them into a few kernels).
Everything runs in float32 (float64 stays) and the output is cast to ``kv``'s dtype.

The composite stays for what this does not cover: incremental decoding (the conv's cached
context) and context parallelism (the conv's halo comes from another rank). A test holds the two
to float32 rounding, values and every gradient.

Legend: B batch, T sequence, G branches (hc_mult), D hidden, C = G*D conv channels, K taps.
"""

from __future__ import annotations

import math

import torch

CLAMP = 1e-6  # signed_sqrt's floor on |score|


def _norm(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x * r, r)`` with ``r = 1 / sqrt(mean(x^2) + eps)`` over the last dim (kept): one fused
    op (a single kernel on CUDA) where this torch has it."""
    if _FUSED_RMS is not None:
        return _FUSED_RMS(x, [x.shape[-1]], None, eps)
    r = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    return x * r, r


_FUSED_RMS = getattr(torch.ops.aten, "_fused_rms_norm", None)


def _norm_backward(grad_hat: torch.Tensor, hat: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    """The input gradient of ``hat = x * rms(x)`` from ``grad_hat``."""
    return rms * (grad_hat - hat * (grad_hat * hat).mean(dim=-1, keepdim=True))


def _param_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the last two (a ``[G, D]`` weight's gradient)."""
    return x.flatten(0, -3).sum(dim=0)


def causal_taps(
    x: torch.Tensor, weight: torch.Tensor, dilation: int, left: torch.Tensor | None = None
) -> torch.Tensor:
    """A depthwise causal dilated conv as K shifted multiply-adds (no padding, crop or
    transpose): ``x [N, L, C]``, ``weight [C, K]`` -> ``[N, L, C]``, where output ``t`` reads
    inputs ``t - (K-1-k) * dilation``. ``left [N, W, C]``: the W = (K-1) * dilation inputs before
    ``x`` (a cache or a halo); None: zeros (the sequence start). Differentiable; the fused tail
    runs it without autograd."""
    taps, length = weight.shape[1], x.shape[1]
    columns = weight.unbind(1)
    out = x * columns[taps - 1]
    for k in range(taps - 1):
        shift = (taps - 1 - k) * dilation
        if shift < length:
            out[:, shift:].addcmul_(x[:, : length - shift], columns[k])
        if left is not None:
            width, inside = left.shape[1], min(shift, length)
            out[:, :inside].addcmul_(left[:, width - shift : width - shift + inside], columns[k])
    return out


def taps_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input gradient ``[N, L, C]``, weight gradient ``[C, K]``) of ``causal_taps`` without
    ``left``."""
    taps, length = weight.shape[1], x.shape[1]
    columns = weight.unbind(1)
    grad_x = grad * columns[taps - 1]
    grad_columns = []
    for k in range(taps - 1):
        shift = (taps - 1 - k) * dilation
        if shift < length:
            grad_x[:, : length - shift].addcmul_(grad[:, shift:], columns[k])
            grad_columns.append((grad[:, shift:] * x[:, : length - shift]).sum(dim=(0, 1)))
        else:
            grad_columns.append(torch.zeros_like(columns[k]))
    grad_columns.append((grad * x).sum(dim=(0, 1)))
    return grad_x, torch.stack(grad_columns, dim=1)


class EngramMix(torch.autograd.Function):
    """``(kv [B, T, (G+1)*D], hidden [B, T, G, D], spec, *weights) -> (out [B, T, G, D] in kv's
    dtype, gate [B, T, G, 1] float32, not differentiable)``.

    ``spec`` = (G, D, gate eps, conv eps, dilation, with conv); ``weights``: the G key-norm
    weights ``[D]``, the G query-norm weights, and with the conv the G conv-norm weights and the
    conv weight ``[C, 1, K]`` (the modules' own parameters: their gradients land unstacked)."""

    @staticmethod
    def forward(ctx, kv, hidden, spec, *weights):
        branches, dim, gate_eps, conv_eps, dilation, with_conv = spec
        f32 = torch.promote_types(kv.dtype, torch.float32)  # float32 (float64 stays: gradcheck)
        key_w = torch.stack(weights[:branches]).to(f32)  # [G, D]
        query_w = torch.stack(weights[branches : 2 * branches]).to(f32)
        kv32, hidden32 = kv.to(f32), hidden.to(f32)
        keys = kv32[..., : branches * dim].unflatten(-1, (branches, dim))
        value = kv32[..., branches * dim :].unsqueeze(2)  # [B, T, 1, D]
        (khat, rk), (qhat, rq) = _norm(keys, gate_eps), _norm(hidden32, gate_eps)
        # the reference's order: a score near 0 is a cancellation, and signed_sqrt's slope there
        # amplifies any other rounding
        score = ((khat * key_w) * (qhat * query_w)).sum(dim=-1, keepdim=True) / math.sqrt(dim)
        floored = score.abs().clamp_min(CLAMP)
        gate = torch.sigmoid(floored.sqrt() * score.sign())  # [B, T, G, 1]
        out = gate * value  # [B, T, G, D]
        saved = [kv, khat, qhat, rk, rq, score, gate, key_w, query_w]
        if with_conv:
            conv_norm_w = torch.stack(weights[2 * branches : 3 * branches]).to(f32)
            conv_w = weights[-1].flatten(1).to(f32)  # [C, K]
            ohat, ro = _norm(out, conv_eps)
            normed = (ohat * conv_norm_w).flatten(-2)  # [B, T, C]
            pre = causal_taps(normed, conv_w, dilation)
            out = out + torch.nn.functional.silu(pre).view_as(out)
            saved += [ro, ohat, normed, pre, conv_norm_w, conv_w]
        ctx.save_for_backward(*saved)
        ctx.spec, ctx.dtypes = spec, (hidden.dtype, [w.dtype for w in weights])
        ctx.weight_shapes = [w.shape for w in weights]
        ctx.mark_non_differentiable(gate)
        return out.to(kv.dtype), gate

    @staticmethod
    def backward(ctx, grad_out, _grad_gate):
        kv, khat, qhat, rk, rq, score, gate, key_w, query_w, *conv = ctx.saved_tensors
        branches, dim, _, _, dilation, with_conv = ctx.spec
        value = kv[..., branches * dim :].to(khat.dtype).unsqueeze(2)
        grad_gated = grad_out.to(khat.dtype)
        conv_grads = []
        if with_conv:
            ro, ohat, normed, pre, conv_norm_w, conv_w = conv
            grad_pre = torch.ops.aten.silu_backward(grad_gated.flatten(-2), pre)
            grad_normed, grad_conv_w = taps_backward(grad_pre, normed, conv_w, dilation)
            grad_normed = grad_normed.view_as(grad_gated)
            conv_grads = [*_param_sum(grad_normed * ohat).unbind(0), grad_conv_w]
            grad_gated = grad_gated + _norm_backward(grad_normed * conv_norm_w, ohat, ro)
        grad_gate = (grad_gated * value).sum(dim=-1, keepdim=True)
        grad_value = (grad_gated * gate).sum(dim=2)  # [B, T, D]
        floored = score.abs().clamp_min(CLAMP)
        slope = (score.abs() >= CLAMP) / (2 * math.sqrt(dim) * floored.sqrt())
        grad_score = grad_gate * gate * (1 - gate) * slope  # [B, T, G, 1]
        grad_k = grad_score * (qhat * query_w)  # d score / d (khat * key_w)
        grad_q = grad_score * (khat * key_w)
        norm_grads = [*_param_sum(grad_k * khat).unbind(0), *_param_sum(grad_q * qhat).unbind(0)]
        grad_keys = _norm_backward(grad_k * key_w, khat, rk)
        grad_hidden = _norm_backward(grad_q * query_w, qhat, rq)
        grad_kv = torch.cat([grad_keys.flatten(-2), grad_value], dim=-1).to(kv.dtype)
        hidden_dtype, weight_dtypes = ctx.dtypes
        grads = [
            (g if g.shape == shape else g.reshape(shape)).to(dtype)
            for g, shape, dtype in zip(
                norm_grads + conv_grads, ctx.weight_shapes, weight_dtypes, strict=True
            )
        ]
        return grad_kv, grad_hidden.to(hidden_dtype), None, *grads


def engram_mix(kv, hidden, spec, *weights):
    """``EngramMix.apply``; see there."""
    return EngramMix.apply(kv, hidden, spec, *weights)
