"""A DeepSeek-style decoder with Engram conditional memory, for ``transformers`` (remote code).

This file is self-contained: an exported folder carries it next to ``config.json``, and
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it with nothing but
``torch`` and ``transformers`` installed. It is the inference form of the training framework's
model (engram-pretrain, ``models/``): the same parameters under the same names (prefixed
``model.``, the head as ``lm_head``), so logits match the framework's to float32 rounding.

The model hashes ``input_ids`` itself. The exported hash configuration (``config.engram["hash"]``:
multipliers, primes, compressed pad id, compressed-map checksum, tokenizer identity) and the
compressed map (the ``model.engram_compressed_map`` buffer) rebuild the framework's hasher
exactly. During ``generate()`` the cache carries the last N-1 compressed ids and every Engram
layer's convolution history, so each new token is hashed and convolved incrementally.

Legend: B batch, T new positions, P cached positions, G hc_mult streams, D hidden, H heads,
K Engram heads, Dh Engram head dim, E experts.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


class EngramDeepseekConfig(PretrainedConfig):
    """The framework's ``ModelArgs`` under HF's usual names (``hidden_size``, ...).

    ``moe``: the routed-expert settings (None: dense FFNs only); ``engram``: the Engram module's
    settings with the full hash configuration under ``"hash"`` (None: no Engram layers).
    """

    model_type = "engram_deepseek"

    def __init__(
        self,
        vocab_size: int = 129280,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        attention: str = "mla",
        num_key_value_heads: int = 4,
        head_dim: int = 64,
        q_lora_rank: int = 0,
        kv_lora_rank: int = 64,
        qk_nope_head_dim: int = 32,
        qk_rope_head_dim: int = 16,
        v_head_dim: int = 32,
        intermediate_size: int = 768,
        first_k_dense_replace: int = 1,
        moe: dict | None = None,
        hc_mult: int = 1,
        hc_sinkhorn_iters: int = 20,
        engram: dict | None = None,
        max_position_embeddings: int = 512,
        rope_theta: float = 10000.0,
        yarn: dict | None = None,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.use_cache = use_cache
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.attention, self.num_key_value_heads, self.head_dim = (
            attention,
            num_key_value_heads,
            head_dim,
        )
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.intermediate_size, self.first_k_dense_replace = (
            intermediate_size,
            first_k_dense_replace,
        )
        self.moe, self.engram = moe, engram
        self.hc_mult, self.hc_sinkhorn_iters = hc_mult, hc_sinkhorn_iters
        self.max_position_embeddings, self.rope_theta = max_position_embeddings, rope_theta
        self.yarn = yarn or {"factor": 1.0}
        self.rms_norm_eps = rms_norm_eps
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


# ----- positions -------------------------------------------------------------------------------


def _inv_freq(dim: int, theta: float, yarn: dict) -> torch.Tensor:
    """RoPE inverse frequencies, YaRN-ramped between beta_fast and beta_slow when factor > 1."""
    base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = yarn.get("factor", 1.0)
    if factor <= 1:
        return base.float()
    original = yarn["original_max_position_embeddings"]

    def edge(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo = max(math.floor(edge(yarn["beta_fast"])), 0)
    hi = min(math.ceil(edge(yarn["beta_slow"])), dim - 1)
    interp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
    return (base * (1 - interp) + base / factor * interp).float()


def _mscale(yarn: dict, which: float) -> float:
    factor = yarn.get("factor", 1.0)
    return 1.0 if factor <= 1 else 0.1 * which * math.log(factor) + 1.0


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, T, H, Dr]`` by ``angles [B, T, Dr/2]``."""
    cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


# ----- blocks ----------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    """GQA or MLA; keys and values of earlier positions come from the cache."""

    def __init__(self, cfg: EngramDeepseekConfig, index: int):
        super().__init__()
        self.cfg, self.index, self.mla = cfg, index, cfg.attention == "mla"
        dim, heads = cfg.hidden_size, cfg.num_attention_heads
        if self.mla:
            qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
            if cfg.q_lora_rank > 0:
                self.wq_a = nn.Linear(dim, cfg.q_lora_rank, bias=False)
                self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps)
                self.wq_b = nn.Linear(cfg.q_lora_rank, heads * qk, bias=False)
            else:
                self.wq = nn.Linear(dim, heads * qk, bias=False)
            self.wkv_a = nn.Linear(dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
            self.kv_norm = nn.RMSNorm(cfg.kv_lora_rank, eps=cfg.rms_norm_eps)
            self.wkv_b = nn.Linear(
                cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False
            )
            self.wo = nn.Linear(heads * cfg.v_head_dim, dim, bias=False)
            which = cfg.yarn.get("mscale_all_dim") or cfg.yarn.get("mscale", 1.0)
            self.scale = qk**-0.5 * _mscale(cfg.yarn, which) ** 2
        else:
            hd, kv = cfg.head_dim, cfg.num_key_value_heads
            self.wq = nn.Linear(dim, heads * hd, bias=False)
            self.wk = nn.Linear(dim, kv * hd, bias=False)
            self.wv = nn.Linear(dim, kv * hd, bias=False)
            self.wo = nn.Linear(heads * hd, dim, bias=False)
            self.scale = hd**-0.5 * _mscale(cfg.yarn, cfg.yarn.get("mscale", 1.0)) ** 2

    def _qkv(self, x, angles, cache: Cache | None):
        """q, k, v ``[B, H, T, D]``; k and v cover the cached positions too. The cache holds
        GQA's keys and values, or MLA's compressed latent (after its norm) and the shared
        rotated rope key, from which every step rebuilds the keys and values."""
        b, t, _ = x.shape
        c = self.cfg
        if not self.mla:
            q = _rotate(self.wq(x).view(b, t, -1, c.head_dim), angles).transpose(1, 2)
            k = _rotate(self.wk(x).view(b, t, -1, c.head_dim), angles).transpose(1, 2)
            v = self.wv(x).view(b, t, -1, c.head_dim).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(k, v, self.index)
            return q, k, v
        nope, rope = c.qk_nope_head_dim, c.qk_rope_head_dim
        q = self.wq_b(self.q_norm(self.wq_a(x))) if c.q_lora_rank > 0 else self.wq(x)
        q_nope, q_pe = q.view(b, t, -1, nope + rope).split([nope, rope], dim=-1)
        q = torch.cat([q_nope, _rotate(q_pe, angles)], dim=-1).transpose(1, 2)
        latent, k_pe = self.wkv_a(x).split([c.kv_lora_rank, rope], dim=-1)
        latent = self.kv_norm(latent).unsqueeze(1)  # [B, 1, T, rank]: one latent for all heads
        k_pe = _rotate(k_pe.unsqueeze(2), angles).transpose(1, 2)  # [B, 1, T, Dr]
        if cache is not None:
            latent, k_pe = cache.update(latent, k_pe, self.index)
        total = latent.shape[2]
        kv = self.wkv_b(latent[:, 0]).view(b, total, -1, nope + c.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([nope, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        return q, k, v

    def forward(self, x, angles, cache: Cache | None):
        past = cache.get_seq_length(self.index) if cache is not None else 0
        q, k, v = self._qkv(x, angles, cache)
        if q.shape[1] != k.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        t, total = q.shape[2], k.shape[2]
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:  # new position i sees every cached one and the new ones up to itself
            rows = torch.arange(t, device=q.device).unsqueeze(1) + past
            mask = torch.arange(total, device=q.device).unsqueeze(0) <= rows
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.wo(out.transpose(1, 2).flatten(2))


class Router(nn.Module):
    def __init__(self, dim: int, moe: dict):
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(dim, moe["num_routed_experts"], bias=False)
        self.register_buffer("expert_bias", torch.zeros(moe["num_routed_experts"]))

    def forward(self, x):
        m = self.moe
        logits = self.gate(x).float()
        scores = logits.sigmoid() if m["score_func"] == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.expert_bias
        groups = m.get("n_group", 1)
        if groups > 1:  # keep the top_k_group groups by the sum of their two best scores
            grouped = choice.unflatten(-1, (groups, -1))
            best = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = torch.zeros_like(best).scatter_(1, best.topk(m["topk_group"], dim=-1).indices, 1)
            choice = grouped.masked_fill(keep.unsqueeze(-1) == 0, float("-inf")).flatten(1)
        index = choice.topk(m["top_k"], dim=-1).indices
        weights = scores.gather(1, index)
        if m["normalize_weights"] and m["top_k"] > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return index, (weights * m["route_scale"]).type_as(x)


class Experts(nn.Module):
    def __init__(self, dim: int, hidden: int, count: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(count, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(count, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(count, hidden, dim))


class MoE(nn.Module):
    def __init__(self, dim: int, moe: dict):
        super().__init__()
        self.router = Router(dim, moe)
        self.experts = Experts(dim, moe["expert_hidden_dim"], moe["num_routed_experts"])
        shared = moe["num_shared_experts"]
        self.shared_experts = SwiGLU(dim, moe["expert_hidden_dim"] * shared) if shared else None

    def forward(self, x):
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        index, weights = self.router(flat)
        out = torch.zeros_like(flat)
        e = self.experts
        for expert in index.unique().tolist():
            token, slot = (index == expert).nonzero(as_tuple=True)
            h = flat[token]
            y = (F.silu(h @ e.w1[expert]) * (h @ e.w3[expert])) @ e.w2[expert]
            out.index_add_(0, token, y * weights[token, slot].unsqueeze(1))
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(b, t, d)


def _sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    log_m = logits.float()
    for _ in range(iters):
        log_m = log_m - log_m.logsumexp(dim=-1, keepdim=True)
        log_m = log_m - log_m.logsumexp(dim=-2, keepdim=True)
    return log_m.exp().type_as(logits)


class HyperConnection(nn.Module):
    """mHC wiring of one sublayer over G streams (a plain residual when G = 1)."""

    def __init__(self, dim: int, g: int, iters: int):
        super().__init__()
        self.g, self.iters = g, iters
        if g > 1:
            self.proj = nn.Linear(g * dim, 2 * g + g * g, bias=False)
            self.static_pre = nn.Parameter(torch.empty(g))
            self.static_post = nn.Parameter(torch.empty(g))
            self.static_res = nn.Parameter(torch.empty(g, g))
            self.alpha = nn.Parameter(torch.empty(3))

    def pre(self, x):
        if self.g == 1:
            return x[:, :, 0], None
        g = self.g
        dyn = self.proj(F.rms_norm(x.flatten(2), (x.shape[2] * x.shape[3],), eps=1e-6))
        pre = torch.sigmoid(self.alpha[0] * dyn[..., :g] + self.static_pre)
        post = 2 * torch.sigmoid(self.alpha[1] * dyn[..., g : 2 * g] + self.static_post)
        eye = torch.eye(g, dtype=torch.bool, device=x.device)
        prior = torch.where(eye, 0.0, -8.0).to(dyn.dtype)
        res = self.alpha[2] * dyn[..., 2 * g :].unflatten(-1, (g, g)) + self.static_res + prior
        return torch.einsum("btg,btgd->btd", pre, x), (post, _sinkhorn(res, self.iters))

    def post(self, x, out, ctx):
        if self.g == 1:
            return x + out.unsqueeze(2)
        post, res = ctx
        return torch.einsum("btgh,bthd->btgd", res, x) + post.unsqueeze(-1) * out.unsqueeze(2)


class StreamMerge(nn.Module):
    def __init__(self, dim: int, g: int):
        super().__init__()
        self.g = g
        if g > 1:
            self.proj = nn.Linear(g * dim, g, bias=False)
            self.static = nn.Parameter(torch.empty(g))
            self.alpha = nn.Parameter(torch.empty(1))

    def forward(self, x):
        if self.g == 1:
            return x[:, :, 0]
        z = F.rms_norm(x.flatten(2), (x.shape[2] * x.shape[3],), eps=1e-6)
        return torch.einsum(
            "btg,btgd->btd", torch.sigmoid(self.alpha * self.proj(z) + self.static), x
        )


# ----- Engram ----------------------------------------------------------------------------------


class EngramHash:
    """The framework's n-gram hash on compressed ids, in torch (int64 wraps like numpy's)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.n = int(spec["max_ngram_size"])
        self.heads = int(spec["n_head_per_ngram"])
        self.pad = int(spec["compressed_pad_id"])
        self.multipliers = {int(k): [int(m) for m in v] for k, v in spec["multipliers"].items()}
        self.primes = {int(k): v for k, v in spec["primes"].items()}

    def __call__(self, window: torch.Tensor, layer: int) -> torch.Tensor:
        """``window [B, N-1+T]`` compressed ids (N-1 of look-back first) -> ``[B, T, K]``."""
        t = window.shape[1] - (self.n - 1)
        shifted = [window[:, self.n - 1 - k : self.n - 1 - k + t] for k in range(self.n)]
        mult = self.multipliers[layer]
        mix = shifted[0] * mult[0]
        heads = []
        for order in range(2, self.n + 1):
            mix = torch.bitwise_xor(mix, shifted[order - 1] * mult[order - 1])
            heads += [torch.remainder(mix, p) for p in self.primes[layer][order - 2]]
        return torch.stack(heads, dim=-1)


class ShortConv(nn.Module):
    def __init__(self, dim: int, g: int, kernel: int, dilation: int):
        super().__init__()
        channels = dim * g
        self.kernel, self.dilation = kernel, dilation
        self.conv = nn.Conv1d(
            channels, channels, kernel, groups=channels, bias=False, dilation=dilation
        )
        self.norms = nn.ModuleList([nn.RMSNorm(dim, eps=1e-5) for _ in range(g)])

    @property
    def history(self) -> int:
        return (self.kernel - 1) * self.dilation

    def forward(self, x, past: torch.Tensor | None):
        """``x [B, T, G, D]``; ``past [B, G*D, history]`` normed inputs of earlier positions
        (None: the sequence starts here). Returns the output and the new history."""
        b, t, g, d = x.shape
        normed = torch.cat([self.norms[i](x[:, :, i]) for i in range(g)], dim=-1).transpose(1, 2)
        if past is None:
            past = normed.new_zeros(b, g * d, self.history)
        full = torch.cat([past, normed], dim=-1)
        y = F.silu(self.conv(full)).transpose(1, 2).reshape(b, t, g, d)
        return y, full[..., full.shape[-1] - self.history :]


class Engram(nn.Module):
    def __init__(self, cfg: EngramDeepseekConfig, layer: int):
        super().__init__()
        e = cfg.engram
        spec = e["hash"]
        self.layer, self.dim, self.g = layer, cfg.hidden_size, cfg.hc_mult
        self.variant = e["variant"]
        n, heads = int(spec["max_ngram_size"]), int(spec["n_head_per_ngram"])
        sizes = [p for order in spec["primes"][str(layer)] for p in order]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        head_dim = e["n_embed_per_ngram"] // heads
        self.table = nn.Module()
        self.table.weight = nn.Parameter(torch.empty(sum(sizes), head_dim))
        embed = (n - 1) * e["n_embed_per_ngram"]
        dim, g = cfg.hidden_size, cfg.hc_mult
        eps = e.get("gate_norm_eps")
        if self.variant == "paper":
            self.value_proj = nn.Linear(embed, dim)
            self.key_projs = nn.ModuleList([nn.Linear(embed, dim) for _ in range(g)])
            self.short_conv = ShortConv(dim, g, e["kernel_size"], n)
        else:
            self.kv_proj = nn.Linear(embed, (g + 1) * dim, bias=False)
        self.key_norms = nn.ModuleList([nn.RMSNorm(dim, eps=eps) for _ in range(g)])
        self.query_norms = nn.ModuleList([nn.RMSNorm(dim, eps=eps) for _ in range(g)])

    def forward(self, hidden, hash_ids, conv_past):
        offsets = torch.tensor(self.offsets, device=hash_ids.device)
        rows = F.embedding(hash_ids + offsets, self.table.weight).flatten(-2)
        if self.variant == "paper":
            keys = [proj(rows) for proj in self.key_projs]
            value = self.value_proj(rows)
        else:
            *keys, value = self.kv_proj(rows).split(self.dim, dim=-1)
        gates = []
        for i in range(self.g):
            k, q = keys[i], hidden[:, :, i]
            kn, qn = self.key_norms[i], self.query_norms[i]
            if self.variant == "paper":
                score = (kn(k) * qn(q)).sum(dim=-1)
            else:  # the whole gate in float32
                f = torch.float32
                k = F.rms_norm(k.to(f), (self.dim,), kn.weight.to(f), kn.eps)
                score = (k * F.rms_norm(q.to(f), (self.dim,), qn.weight.to(f), qn.eps)).sum(-1)
            score = score / math.sqrt(self.dim)
            score = score.abs().clamp_min(1e-6).sqrt() * score.sign()
            gates.append(score.sigmoid().unsqueeze(-1))
        out = torch.stack(gates, dim=2).to(value.dtype) * value.unsqueeze(2)
        if self.variant != "paper":
            return out, None
        conv, history = self.short_conv(out, conv_past)
        return out + conv, history


class Block(nn.Module):
    def __init__(self, cfg: EngramDeepseekConfig, layer: int):
        super().__init__()
        engram_layers = cfg.engram["hash"]["layer_ids"] if cfg.engram else []
        self.engram = Engram(cfg, layer) if layer in engram_layers else None
        dim, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.attention_norm = nn.RMSNorm(dim, eps=eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = nn.RMSNorm(dim, eps=eps)
        is_moe = cfg.moe is not None and layer >= cfg.first_k_dense_replace
        self.moe = MoE(dim, cfg.moe) if is_moe else None
        self.feed_forward = None if is_moe else SwiGLU(dim, cfg.intermediate_size)
        self.attn_hc = HyperConnection(dim, cfg.hc_mult, cfg.hc_sinkhorn_iters)
        self.ffn_hc = HyperConnection(dim, cfg.hc_mult, cfg.hc_sinkhorn_iters)

    def forward(self, x, angles, cache, hash_ids, conv_state: dict):
        if self.engram is not None:
            layer = self.engram.layer
            out, conv_state[layer] = self.engram(x, hash_ids[layer], conv_state.get(layer))
            x = x + out
        h, ctx = self.attn_hc.pre(x)
        x = self.attn_hc.post(x, self.attention(self.attention_norm(h), angles, cache), ctx)
        h, ctx = self.ffn_hc.pre(x)
        ffn = self.moe if self.moe is not None else self.feed_forward
        return self.ffn_hc.post(x, ffn(self.ffn_norm(h)), ctx)


# ----- the model -------------------------------------------------------------------------------


class EngramDeepseekPreTrainedModel(PreTrainedModel):
    config_class = EngramDeepseekConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        """Exported folders carry every weight; fresh models (``from_config``) get small
        normal weights, unit norms and the mHC identity start, enough to run."""
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Experts):
            for w in (module.w1, module.w2, module.w3):
                nn.init.normal_(w, std=0.02)
        elif isinstance(module, (HyperConnection, StreamMerge)) and module.g > 1:
            for name, p in module.named_parameters(recurse=False):
                nn.init.zeros_(p) if name != "alpha" else nn.init.constant_(p, 0.01)
        elif isinstance(module, Engram):
            nn.init.normal_(module.table.weight)


class EngramDeepseekModel(EngramDeepseekPreTrainedModel):
    def __init__(self, config: EngramDeepseekConfig):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): Block(config, i) for i in range(config.num_hidden_layers)}
        )
        self.merge = StreamMerge(config.hidden_size, config.hc_mult)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        rope = config.qk_rope_head_dim if config.attention == "mla" else config.head_dim
        self.rope_dim = rope
        self.hash = EngramHash(config.engram["hash"]) if config.engram else None
        if self.hash is not None:  # raw id -> compressed id, saved with the weights
            size = config.engram.get("compressed_map_size", config.vocab_size)  # tokenizer ids
            self.register_buffer("engram_compressed_map", torch.zeros(size, dtype=torch.long))
        self._map_checked = False
        self.post_init()

    def _check_map(self) -> None:
        """The compressed map must be the one the hash configuration was made with."""
        if self._map_checked:
            return
        lookup = self.engram_compressed_map.detach().cpu().numpy().astype("<i8")
        digest = hashlib.sha256(lookup.tobytes()).hexdigest()
        if digest != self.config.engram["hash"]["compressed_map_sha256"]:
            raise ValueError(
                "model.engram_compressed_map does not match the exported hash configuration "
                "(compressed_map_sha256 differs): the weights and config.json come from different "
                "exports; re-export the checkpoint"
            )
        self._map_checked = True

    def _hash_ids(self, input_ids, cache) -> dict[int, torch.Tensor]:
        if self.hash is None:
            return {}
        self._check_map()
        raw = self.engram_compressed_map.numel()
        if int(input_ids.max()) >= raw:
            raise ValueError(
                f"token id {int(input_ids.max())} is outside the tokenizer the Engram hash was "
                f"built for ({raw} ids)"
            )
        compressed = self.engram_compressed_map[input_ids]
        look_back = self.hash.n - 1
        state = getattr(cache, "engram_state", None) if cache is not None else None
        if cache is not None and cache.get_seq_length() > 0 and state is None:
            raise ValueError(
                "this cache holds earlier positions but no Engram state: pass the cache this "
                "model returned (past_key_values of its last output)"
            )
        if state is None or cache.get_seq_length() == 0:
            past = compressed.new_full((compressed.shape[0], look_back), self.hash.pad)
            state = {"ids": past, "conv": {}}
        window = torch.cat([state["ids"], compressed], dim=1)
        if cache is not None:
            state["ids"] = window[:, window.shape[1] - look_back :]
            cache.engram_state = state
        return {
            layer: self.hash(window, layer) for layer in self.config.engram["hash"]["layer_ids"]
        }

    def forward(self, input_ids, past_key_values: Cache | None = None):
        b, t = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {past + t} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        hash_ids = self._hash_ids(input_ids, past_key_values)
        positions = torch.arange(past, past + t, device=input_ids.device, dtype=torch.float32)
        inv = _inv_freq(self.rope_dim, self.config.rope_theta, self.config.yarn).to(
            input_ids.device
        )
        angles = (positions.unsqueeze(1) * inv).unsqueeze(0).expand(b, -1, -1)
        x = self.tok_embeddings(input_ids).unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1)
        conv = getattr(past_key_values, "engram_state", {"conv": {}})["conv"] if past else {}
        for block in self.layers.values():
            x = block(x, angles, past_key_values, hash_ids, conv)
        if past_key_values is not None and self.hash is not None:
            past_key_values.engram_state["conv"] = conv
        return self.norm(self.merge(x))


class EngramDeepseekForCausalLM(EngramDeepseekPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.tok_embeddings.weight"}

    def __init__(self, config: EngramDeepseekConfig):
        super().__init__(config)
        self.model = EngramDeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``attention_mask`` may only mark every position (no padding): an Engram n-gram and
        the convolution run over positions, so a batch of prompts must have equal lengths."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "padded batches are not supported: Engram's n-grams and convolution look back "
                "over positions; generate prompts of equal length, or one at a time"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        hidden = self.model(input_ids, past_key_values if use_cache else None)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None
        )
