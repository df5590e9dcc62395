"""Engram conditional memory module (DeepSeek, "Conditional Memory via Scalable Lookup", 2026).

Matches the public reference (deepseek-ai/Engram ``engram_demo_v1.py``) to float32 rounding, and
adds the DeepSeek-V4.1 production variant behind ``EngramConfig.variant``. Hash ids come from the
data loader (``data.ngram_hash.NgramHasher``); the module never hashes.

Legend: B batch, T sequence, G hc_mult streams, D hidden, K = (N-1)*H heads, Dh head dim, E = K*Dh.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from data.batch import EngramInputs
from data.ngram_hash import EngramHashSpec
from models.args import EngramConfig
from models.engram_fused import causal_taps, engram_mix
from models.sequence import LOCAL_SEQUENCE
from models.sharded_init import kaiming_uniform_, normal_
from models.tables.table import EngramTable

if TYPE_CHECKING:
    from models.kv_cache import LayerCache


def signed_sqrt(x: torch.Tensor) -> torch.Tensor:
    return x.abs().clamp_min(1e-6).sqrt() * x.sign()


def branch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    """RMSNorm of every branch at once: ``x [..., G, D]`` with per-branch weights ``[G, D]`` (one
    fused norm and one multiply instead of G norms)."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps) * weight


def engram_gate(
    keys: torch.Tensor,
    query: torch.Tensor,
    key_weight: torch.Tensor,
    query_weight: torch.Tensor,
    eps: float | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``sigmoid(signed_sqrt(<norm(key), norm(query)> / sqrt(D)))`` of every branch: ``keys``
    and ``query [B, T, G, D]``, norm weights ``[G, D]`` -> ``[B, T, G, 1]``. ``dtype``: the whole
    gate in that dtype, norm weights included (V4.1: float32)."""
    if dtype is not None:
        keys, query = keys.to(dtype), query.to(dtype)
        key_weight, query_weight = key_weight.to(dtype), query_weight.to(dtype)
    k = branch_rms_norm(keys, key_weight, eps)
    q = branch_rms_norm(query, query_weight, eps)
    score = (k * q).sum(dim=-1, keepdim=True) / math.sqrt(keys.shape[-1])
    return signed_sqrt(score).sigmoid()


class ShortConv(nn.Module):
    """Per-branch RMSNorm, depthwise causal conv over G*D channels (dilation = N), SiLU.

    The conv runs as shifted multiply-adds (``engram_fused.causal_taps``); ``conv`` holds its
    weight under the reference's name (``short_conv.conv.weight [G*D, 1, K]``)."""

    def __init__(self, dim: int, hc_mult: int, kernel_size: int, dilation: int, init: str):
        super().__init__()
        self.hc_mult, self.kernel_size, self.dilation, self.init = (
            hc_mult,
            kernel_size,
            dilation,
            init,
        )
        channels = dim * hc_mult
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            groups=channels,
            bias=False,
            padding=(kernel_size - 1) * dilation,
            dilation=dilation,
        )
        self.norms = nn.ModuleList([nn.RMSNorm(dim, eps=1e-5) for _ in range(hc_mult)])
        # the sequence seam: under context parallelism the left context of each local chunk
        # (its halo) comes from the rank holding the chunk before it
        self.sequence = LOCAL_SEQUENCE

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """``x [B, T, G, D]`` -> ``[B, T, G, D]``; ``cache``: incremental decoding, whose left
        context is the cached inputs of the positions before these."""
        batch, seq, streams, dim = x.shape
        weights = torch.stack([norm.weight for norm in self.norms])  # [G, D]
        normed = branch_rms_norm(x, weights, self.norms[0].eps).reshape(batch, seq, -1)
        if cache is not None:
            y = self._decoding(normed, cache)
        elif self.sequence.degree == 1:
            y = causal_taps(normed, self.conv.weight[:, 0], self.dilation)
        else:
            y = self._chunked(normed)
        return F.silu(y).reshape(batch, seq, streams, dim)

    @property
    def context_width(self) -> int:
        """Earlier positions one output reads: ``(kernel - 1) * dilation``."""
        return (self.kernel_size - 1) * self.dilation

    def _decoding(self, normed: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """``[B, T, C]`` after the cached context (zeros at the sequence start, as the causal
        padding of a whole-sequence forward)."""
        batch, _, channels = normed.shape
        width = self.context_width
        left = cache.conv_context
        if left is None:
            left = normed.new_zeros(batch, width, channels)
        seen = torch.cat([left, normed], dim=1)
        cache.conv_context = seen[:, seen.shape[1] - width :]
        return causal_taps(normed, self.conv.weight[:, 0], self.dilation, left)

    def _chunked(self, normed: torch.Tensor) -> torch.Tensor:
        """The conv of each local chunk after its halo (context parallelism):
        ``[B, L*S, C]`` -> ``[B, L*S, C]``."""
        batch, seq, channels = normed.shape
        halo = self.sequence.halo(normed, self.context_width)  # [B, S, W, C]
        chunks = halo.shape[1]
        local = normed.reshape(batch * chunks, seq // chunks, channels)
        out = causal_taps(local, self.conv.weight[:, 0], self.dilation, halo.flatten(0, 1))
        return out.reshape(batch, seq, channels)  # the halo is the left context

    @torch.no_grad()
    def init_weights(self) -> None:
        for norm in self.norms:
            norm.reset_parameters()
        if self.init == "zero":
            nn.init.zeros_(self.conv.weight)
        else:
            # nn.Conv1d.reset_parameters, written so a sharded weight gets its slice
            kaiming_uniform_(self.conv.weight, a=math.sqrt(5))


class Engram(nn.Module):
    """One Engram layer: table lookup, per-branch gate, value, optional ShortConv.

    ``forward(hidden [B, T, G, D], inputs) -> [B, T, G, D]``; the caller adds it to the residual
    streams.
    """

    def __init__(
        self, cfg: EngramConfig, layer_id: int, dim: int, hc_mult: int, table_sizes: list[int]
    ):
        super().__init__()
        self.cfg, self.layer_id, self.dim, self.hc_mult = cfg, layer_id, dim, hc_mult
        self.table = EngramTable(table_sizes, cfg.head_dim, sparse=cfg.sparse_grad)
        embed = cfg.embed_dim
        if cfg.variant == "paper":
            self.value_proj = nn.Linear(embed, dim)
            self.key_projs = nn.ModuleList([nn.Linear(embed, dim) for _ in range(hc_mult)])
            self.short_conv = ShortConv(
                dim, hc_mult, cfg.kernel_size, cfg.max_ngram_size, cfg.conv_init
            )
        else:  # v4.1: one fused key/value projection without bias: G keys then one value
            self.kv_proj = nn.Linear(embed, (hc_mult + 1) * dim, bias=False)
        eps = cfg.gate_norm_eps
        self.key_norms = nn.ModuleList([nn.RMSNorm(dim, eps=eps) for _ in range(hc_mult)])
        self.query_norms = nn.ModuleList([nn.RMSNorm(dim, eps=eps) for _ in range(hc_mult)])
        self.gate_probe = nn.Identity()  # no parameters: a hook point for gate statistics
        self.fused = True  # the fused dense tail (models.engram_fused) where it applies
        # the key/value product, ``F.linear``'s signature (FP8 swaps it: models.quantize)
        self.kv_matmul = F.linear

    def forward(
        self,
        hidden: torch.Tensor,
        inputs: EngramInputs | torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """``inputs``: this layer's ``EngramInputs`` from the batch (hash ids and the lookup plan
        of the table's planner), or bare hash ids ``[B, T, K]``. ``cache``: incremental decoding
        (the ShortConv's context)."""
        if torch.is_tensor(inputs):
            inputs = EngramInputs(inputs)
        # rows already looked up (outside a recomputed block: ``parallel.wrappers``), or now
        rows = inputs.rows if inputs.rows is not None else self.table(inputs.hash_ids, inputs.plan)
        rows = rows.flatten(start_dim=-2)  # [B, T, K, Dh] -> [B, T, E]
        return self.combine(hidden, rows, cache)

    def combine(
        self, hidden: torch.Tensor, rows: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Gate, value and conv from already-fetched rows ``[B, T, E]`` (prefetch/offload seam).

        The G key projections and the value projection run as one GEMM (the paper variant
        concatenates their weights, which keep their own names; V4.1 stores them fused). The
        rest runs as one fused autograd function (``models.engram_fused``), or as the composite
        below for decoding and context parallelism (``fused = False`` forces it)."""
        if self.cfg.variant == "paper":
            projs = [*self.key_projs, self.value_proj]
            weight = torch.cat([p.weight for p in projs])  # [(G+1) * D, E]
            kv = self.kv_matmul(rows, weight, torch.cat([p.bias for p in projs]))
        else:
            kv = self.kv_matmul(rows, self.kv_proj.weight, None)
        conv = self.short_conv if self.cfg.variant == "paper" else None
        if self.fused and cache is None and (conv is None or conv.sequence.degree == 1):
            eps = self.cfg.gate_norm_eps
            eps = torch.finfo(torch.float32).eps if eps is None else eps
            weights = [n.weight for n in [*self.key_norms, *self.query_norms]]
            if conv is None:
                spec = (self.hc_mult, self.dim, eps, 0.0, 1, False)
            else:
                weights += [n.weight for n in conv.norms] + [conv.conv.weight]
                spec = (self.hc_mult, self.dim, eps, conv.norms[0].eps, conv.dilation, True)
            out, gates = engram_mix(kv, hidden, spec, *weights)
            self.gate_probe(gates)  # identity; ``GateMonitor`` hooks it
            return out
        key_w = torch.stack([n.weight for n in self.key_norms])  # [G, D]
        query_w = torch.stack([n.weight for n in self.query_norms])
        split = self.hc_mult * self.dim
        keys = kv[..., :split].unflatten(-1, (self.hc_mult, self.dim))  # [B, T, G, D]
        value = kv[..., split:]  # [B, T, D]
        gate_dtype = None if conv is not None else torch.float32
        eps = self.cfg.gate_norm_eps
        gates = engram_gate(keys, hidden, key_w, query_w, eps, gate_dtype)  # [B, T, G, 1]
        gates = self.gate_probe(gates)
        out = gates.to(value.dtype) * value.unsqueeze(2)  # [B, T, G, D]
        if conv is not None:
            out = out + conv(out, cache)
        return out

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        self.table.init_weights()
        for norm in [*self.key_norms, *self.query_norms]:
            norm.reset_parameters()
        linears = (
            [self.value_proj, *self.key_projs] if self.cfg.variant == "paper" else [self.kv_proj]
        )
        for linear in linears:
            normal_(linear.weight, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if self.cfg.variant == "paper":
            self.short_conv.init_weights()


def reference_state_dict_map(hc_mult: int, variant: str = "paper") -> dict[str, str]:
    """Reference module state-dict name -> ours (the single place this mapping lives)."""
    mapping = {"multi_head_embedding.embedding.weight": "table.weight"}
    for i in range(hc_mult):
        mapping[f"norm1.{i}.weight"] = f"key_norms.{i}.weight"
        mapping[f"norm2.{i}.weight"] = f"query_norms.{i}.weight"
    if variant == "paper":
        mapping["value_proj.weight"] = "value_proj.weight"
        mapping["value_proj.bias"] = "value_proj.bias"
        mapping["short_conv.conv.weight"] = "short_conv.conv.weight"
        for i in range(hc_mult):
            mapping[f"key_projs.{i}.weight"] = f"key_projs.{i}.weight"
            mapping[f"key_projs.{i}.bias"] = f"key_projs.{i}.bias"
            mapping[f"short_conv.norms.{i}.weight"] = f"short_conv.norms.{i}.weight"
    return mapping


def load_reference_state_dict(module: Engram, reference: dict[str, torch.Tensor]) -> None:
    """Load weights saved under the reference module's names (strict: every name must map)."""
    mapping = reference_state_dict_map(module.hc_mult, module.cfg.variant)
    unknown = sorted(set(reference) - set(mapping))
    if unknown:
        raise KeyError(f"reference weights with no counterpart here: {unknown}")
    ours = {mapping[name]: tensor for name, tensor in reference.items()}
    module.load_state_dict(ours, strict=True)


class GateMonitor:
    """Engram gate statistics from forward hooks (nothing is stored on the modules).

    ``scalars()`` gives ``engram/gate_mean/layer{L}`` of the last forward of every Engram layer
    found in ``model``; ``remove()`` detaches the hooks.
    """

    def __init__(self, model: nn.Module):
        self._last: dict[int, torch.Tensor] = {}
        self._handles = [
            module.gate_probe.register_forward_hook(self._hook(module.layer_id))
            for module in model.modules()
            if isinstance(module, Engram)
        ]

    def _hook(self, layer_id: int):
        def record(module, args, output):
            self._last[layer_id] = output.detach()  # reduced only when asked for

        return record

    def scalars(self) -> dict[str, float]:
        return {
            f"engram/gate_mean/layer{layer}": gates.float().mean().item()
            for layer, gates in sorted(self._last.items())
        }

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._last = [], {}


def unique_row_fraction(engram: dict[int, EngramInputs], spec: EngramHashSpec) -> float | None:
    """``engram/unique_rows_frac``: distinct table rows over lookups, averaged over the layers of
    a batch (what deduplicated table traffic saves)."""
    fractions = []
    for layer, inputs in engram.items():
        offsets = torch.from_numpy(spec.head_offsets(layer)).to(inputs.hash_ids.device)
        flat = inputs.hash_ids + offsets  # [B, T, K] per-head ids -> flat rows
        fractions.append(flat.unique().numel() / flat.numel())
    return sum(fractions) / len(fractions) if fractions else None
