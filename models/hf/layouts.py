"""Exported layouts of our weights: names, shapes and configs, as lazy per-tensor sources.

A ``Source`` is one tensor of a layout with a ``read_rows(start, stop)`` that produces its rows
on demand, so a mapping from one layout to another is a dict of sources built from the other
layout's sources, and nothing is read until a writer asks for a block.

Layouts:
- ``engram``: the remote-code model of ``modeling_engram.py`` (our module tree under ``model.``,
  plus the Engram compressed map as a buffer; folders of earlier releases named the head
  ``lm_head`` and the map ``model.engram_compressed_map``, which still read back);
- ``deepseek_v3``: ``transformers``' native ``DeepseekV3ForCausalLM`` (no Engram, one stream);
- ``v4.1``: DeepSeek-V4.1's Engram tensors (``layers.{L}.engram.embed|wkv|q_weight|k_weight``),
  optionally FP8 (``models.hf.fp8``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.args import ModelArgs, model_args_to_dict
from models.hf import fp8
from models.hf.safetensors_io import TensorEntry

COMPRESSED_MAP = "engram_compressed_map"
_EARLIER_NAMES = {"lm_head.weight": "output.weight", "model.engram_compressed_map": COMPRESSED_MAP}


@dataclass
class Source:
    """One tensor of a layout: its entry and ``read_rows(start, stop)`` over the first axis."""

    entry: TensorEntry
    read_rows: Callable[[int, int], torch.Tensor]

    def read(self) -> torch.Tensor:
        if not self.entry.shape:
            return self.read_rows(0, 1).reshape(())
        return self.read_rows(0, self.entry.shape[0])


def renamed(src: Source, name: str) -> Source:
    return Source(TensorEntry(name, src.entry.shape, src.entry.dtype), src.read_rows)


def constant(name: str, value: torch.Tensor) -> Source:
    """A tensor in memory as a source (a scalar's one row is its value)."""
    rows = value.contiguous().reshape(1) if value.dim() == 0 else value.contiguous()
    return Source(TensorEntry(name, tuple(value.shape), value.dtype), lambda a, b: rows[a:b])


def cast(src: Source, dtype: torch.dtype | None) -> Source:
    """``src`` in ``dtype`` (floating tensors only; None keeps it)."""
    if dtype is None or not src.entry.dtype.is_floating_point or src.entry.dtype == dtype:
        return src
    entry = TensorEntry(src.entry.name, src.entry.shape, dtype)
    return Source(entry, lambda a, b: src.read_rows(a, b).to(dtype))


# ----- engram (remote code) ---------------------------------------------------------------------


def to_engram_hf(ours: dict[str, Source], compressed_map: torch.Tensor | None) -> dict[str, Source]:
    out = {f"model.{name}": renamed(src, f"model.{name}") for name, src in ours.items()}
    if compressed_map is not None:
        out[COMPRESSED_MAP] = constant(COMPRESSED_MAP, torch.as_tensor(compressed_map))
    return out


def from_engram_hf(hf: dict[str, Source]) -> dict[str, Source]:
    out = {}
    for name, src in hf.items():
        name = _EARLIER_NAMES.get(name, name)
        if name == COMPRESSED_MAP:
            continue  # rebuilt from the tokenizer; its checksum is in the hash configuration
        ours = name.removeprefix("model.")
        out[ours] = renamed(src, ours)
    return out


def compressed_map_name(names) -> str:
    """The compressed map's name in a folder (this release's, or an earlier one's)."""
    earlier = [n for n, now in _EARLIER_NAMES.items() if now == COMPRESSED_MAP and n in names]
    return earlier[0] if earlier and COMPRESSED_MAP not in names else COMPRESSED_MAP


def engram_hf_config(args: ModelArgs, hash_config: dict | None, tokenizer) -> dict:
    moe = None
    if args.moe is not None:
        moe = {k: v for k, v in model_args_to_dict(args)["moe"].items()}
    engram = None
    if args.engram is not None:
        e = model_args_to_dict(args)["engram"]
        engram = {**{k: v for k, v in e.items() if k != "hash"}, "hash": hash_config}
        # raw ids the compressed map covers (the tokenizer's; the embedding may have more rows)
        engram["compressed_map_size"] = tokenizer.vocab_size
    return {
        "architectures": ["EngramDeepseekForCausalLM"],
        "model_type": "engram_deepseek",
        "auto_map": {
            "AutoConfig": "modeling_engram.EngramDeepseekConfig",
            "AutoModelForCausalLM": "modeling_engram.EngramDeepseekForCausalLM",
        },
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "attention": args.attention,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "q_lora_rank": args.q_lora_rank,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "intermediate_size": args.ffn_hidden_dim,
        "first_k_dense_replace": args.num_dense_layers,
        "moe": moe,
        "hc_mult": args.hc_mult,
        "hc_sinkhorn_iters": args.hc_sinkhorn_iters,
        "engram": engram,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "yarn": model_args_to_dict(args)["yarn"],
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        **_special_ids(tokenizer),
    }


def _special_ids(tokenizer) -> dict:
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }


# ----- DeepSeek-V3 (native transformers) --------------------------------------------------------

_V3_NAMES = [  # ours (after "layers.{i}.") -> transformers' DeepseekV3 (after "model.layers.{i}.")
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wq_a.weight", "self_attn.q_a_proj.weight"),
    ("attention.q_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attention.wq_b.weight", "self_attn.q_b_proj.weight"),
    ("attention.wkv_a.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attention.kv_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attention.wkv_b.weight", "self_attn.kv_b_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("moe.router.gate.weight", "mlp.gate.weight"),
    ("moe.router.expert_bias", "mlp.gate.e_score_correction_bias"),
    ("moe.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    ("moe.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
    ("moe.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"),
]
_V3_GLOBAL = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]
_V3_EXPERTS = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")]
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def v3_unsupported(args: ModelArgs) -> list[str]:
    """Why ``args`` cannot be a native DeepseekV3ForCausalLM (empty: it can)."""
    reasons = []
    if args.engram is not None:
        reasons.append("it has Engram layers (export with --layout engram)")
    if args.hc_mult != 1:
        reasons.append(f"hc_mult={args.hc_mult} (V3 has one residual stream)")
    if args.attention != "mla":
        reasons.append(f"attention={args.attention!r} (V3 uses MLA)")
    if args.moe is None:
        reasons.append("it has no MoE layers")
    else:
        if args.moe.score_func != "sigmoid":
            reasons.append(f"moe.score_func={args.moe.score_func!r} (V3 routes with sigmoid)")
        if args.moe.top_k == 1 and args.moe.normalize_weights:
            reasons.append("moe.top_k=1 with normalize_weights (V3 would normalise to 1)")
    if args.tie_embeddings:
        reasons.append("tie_embeddings")
    return reasons


def _expert(src: Source, e: int, name: str) -> Source:
    """Expert ``e`` of our ``[E, in, out]`` stack as a Linear weight ``[out, in]``."""
    _, d_in, d_out = src.entry.shape
    entry = TensorEntry(name, (d_out, d_in), src.entry.dtype)
    return Source(entry, lambda a, b: src.read_rows(e, e + 1)[0].t()[a:b].contiguous())


def _stacked(parts: list[Source], name: str) -> Source:
    """Linear weights ``[out, in]`` of E experts as our ``[E, in, out]`` stack."""
    d_out, d_in = parts[0].entry.shape
    entry = TensorEntry(name, (len(parts), d_in, d_out), parts[0].entry.dtype)
    return Source(entry, lambda a, b: torch.stack([p.read().t() for p in parts[a:b]]))


def to_v3(ours: dict[str, Source]) -> dict[str, Source]:
    table = dict(_V3_NAMES)
    out = {}
    for name, src in ours.items():
        match = _LAYER.match(name)
        if match is None:
            hf = dict(_V3_GLOBAL)[name]
            out[hf] = renamed(src, hf)
            continue
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest.startswith("moe.experts."):
            ours_w = rest.removeprefix("moe.experts.")
            hf_w = dict(_V3_EXPERTS)[ours_w]
            for e in range(src.entry.shape[0]):
                hf = f"{prefix}mlp.experts.{e}.{hf_w}.weight"
                out[hf] = _expert(src, e, hf)
            continue
        hf = prefix + table[rest]
        out[hf] = renamed(src, hf)
    return out


def from_v3(hf: dict[str, Source]) -> dict[str, Source]:
    back = {v: k for k, v in _V3_NAMES}
    global_back = {v: k for k, v in _V3_GLOBAL}
    out: dict[str, Source] = {}
    experts: dict[tuple[str, str], dict[int, Source]] = {}
    unknown = []
    for name, src in hf.items():
        if name in global_back:
            out[global_back[name]] = renamed(src, global_back[name])
            continue
        match = _HF_LAYER.match(name)
        if match is None:
            unknown.append(name)
            continue
        layer, rest = match.groups()
        expert = _HF_EXPERT.match(rest)
        if expert is not None:
            experts.setdefault((layer, expert.group(2)), {})[int(expert.group(1))] = src
        elif rest in back:
            ours = f"layers.{layer}.{back[rest]}"
            out[ours] = renamed(src, ours)
        else:
            unknown.append(name)
    hf_to_ours = {h: o for o, h in _V3_EXPERTS}
    for (layer, kind), parts in experts.items():
        ours = f"layers.{layer}.moe.experts.{hf_to_ours[kind]}"
        out[ours] = _stacked([parts[e] for e in sorted(parts)], ours)
    for name in unknown:  # left under their own names: the caller reports them as unknown
        out[name] = hf[name]
    return out


def v3_config(args: ModelArgs, tokenizer) -> dict:
    moe = args.moe
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "moe_intermediate_size": moe.expert_hidden_dim,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_heads,
        "n_shared_experts": moe.num_shared_experts,
        "n_routed_experts": moe.num_routed_experts,
        "routed_scaling_factor": moe.route_scale,
        "kv_lora_rank": args.kv_lora_rank,
        "q_lora_rank": args.q_lora_rank or None,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        "num_experts_per_tok": moe.top_k,
        "first_k_dense_replace": args.num_dense_layers,
        "norm_topk_prob": moe.normalize_weights,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": False,
        "rope_interleave": True,
        "attention_bias": False,
        "rope_parameters": _rope_parameters(args),
        **_special_ids(tokenizer),
    }
    return config


def _rope_parameters(args: ModelArgs) -> dict:
    y = args.yarn
    if y.factor <= 1:
        return {"rope_type": "default", "rope_theta": args.rope_theta}
    return {
        "rope_type": "yarn",
        "rope_theta": args.rope_theta,
        "factor": y.factor,
        "original_max_position_embeddings": y.original_max_position_embeddings,
        "beta_fast": y.beta_fast,
        "beta_slow": y.beta_slow,
        "mscale": y.mscale,
        "mscale_all_dim": y.mscale_all_dim,
    }


# ----- DeepSeek-V4.1 Engram ---------------------------------------------------------------------

_ENGRAM = re.compile(r"^layers\.(\d+)\.engram\.(.+)$")
_NORM = re.compile(r"^(key|query)_norms\.(\d+)\.weight$")


def _rows_of_stack(parts: list[Source], name: str) -> Source:
    """Vectors ``[D]`` stacked as rows ``[G, D]``."""
    entry = TensorEntry(name, (len(parts), *parts[0].entry.shape), parts[0].entry.dtype)
    return Source(entry, lambda a, b: torch.stack([p.read() for p in parts[a:b]]))


def _row_of(src: Source, row: int, name: str) -> Source:
    entry = TensorEntry(name, tuple(src.entry.shape[1:]), src.entry.dtype)
    return Source(entry, lambda a, b: src.read_rows(row, row + 1)[0][a:b])


def to_v41(ours: dict[str, Source], use_fp8: bool) -> dict[str, Source]:
    """Our Engram layers (variant ``v4.1``) under V4.1's names; other tensors are not part of
    this layout."""
    out: dict[str, Source] = {}
    norms: dict[tuple[str, str], dict[int, Source]] = {}
    for name, src in ours.items():
        match = _ENGRAM.match(name)
        if match is None:
            continue
        layer, rest = match.groups()
        prefix = f"layers.{layer}.engram."
        norm = _NORM.match(rest)
        if norm is not None:
            norms.setdefault((layer, norm.group(1)), {})[int(norm.group(2))] = src
        elif rest == "table.weight":
            out.update(_maybe_fp8(src, prefix + "embed", use_fp8, fp8.quantize_rows))
        elif rest == "kv_proj.weight":
            out.update(_maybe_fp8(src, prefix + "wkv", use_fp8, fp8.quantize_blocks))
        else:
            raise ValueError(
                f"{name}: the V4.1 layout has no counterpart (only the v4.1 variant exports; "
                "set model.overrides.engram.variant='v4.1')"
            )
    for (layer, kind), parts in norms.items():
        name = f"layers.{layer}.engram.{'k' if kind == 'key' else 'q'}_weight"
        out[name] = _rows_of_stack([parts[i] for i in sorted(parts)], name)
    return out


def _maybe_fp8(src: Source, stem: str, use_fp8: bool, quantize) -> dict[str, Source]:
    weight = f"{stem}.weight"
    if not use_fp8:
        return {weight: renamed(src, weight)}
    rows, cols = src.entry.shape
    block = fp8.BLOCK
    scale_rows = rows if quantize is fp8.quantize_rows else -(-rows // block)
    q_entry = TensorEntry(weight, (rows, cols), torch.float8_e4m3fn)
    s_entry = TensorEntry(f"{stem}.scale", (scale_rows, -(-cols // block)), torch.float8_e8m0fnu)
    step = 1 if quantize is fp8.quantize_rows else block  # rows of values per scale row

    def values(a: int, b: int) -> torch.Tensor:
        first = a // step * step
        q, _ = quantize(src.read_rows(first, min(rows, -(-b // step) * step)).float())
        return q[a - first : b - first]

    def scales(a: int, b: int) -> torch.Tensor:
        _, s = quantize(src.read_rows(a * step, min(rows, b * step)).float())
        return s

    return {weight: Source(q_entry, values), f"{stem}.scale": Source(s_entry, scales)}


def from_v41(v41: dict[str, Source], dtype: torch.dtype = torch.float32) -> dict[str, Source]:
    """V4.1 Engram tensors as ours (dequantised to ``dtype`` when FP8)."""
    out: dict[str, Source] = {}
    for name, src in v41.items():
        match = _ENGRAM.match(name)
        if match is None or name.endswith(".scale"):
            continue
        layer, rest = match.groups()
        prefix = f"layers.{layer}.engram."
        if rest in ("embed.weight", "wkv.weight"):
            ours = prefix + ("table.weight" if rest == "embed.weight" else "kv_proj.weight")
            scale = v41.get(name.removesuffix(".weight") + ".scale")
            if scale is None:
                out[ours] = renamed(src, ours)
            else:
                rows_mode = rest == "embed.weight"
                out[ours] = _dequantised(src, scale, ours, dtype, rows_mode)
        elif rest in ("k_weight", "q_weight"):
            kind = "key" if rest == "k_weight" else "query"
            for i in range(src.entry.shape[0]):
                ours = f"{prefix}{kind}_norms.{i}.weight"
                out[ours] = _row_of(src, i, ours)
        else:
            raise ValueError(f"{name}: not a V4.1 Engram tensor this converter knows")
    return out


def _dequantised(q: Source, scale: Source, name: str, dtype, rows_mode: bool) -> Source:
    rows, cols = q.entry.shape
    entry = TensorEntry(name, (rows, cols), dtype)
    step = 1 if rows_mode else fp8.BLOCK

    def read(a: int, b: int) -> torch.Tensor:
        first = a // step * step
        stop = min(rows, -(-b // step) * step)
        values = q.read_rows(first, stop)
        scales = scale.read_rows(first // step, -(-stop // step))
        full = (
            fp8.dequantize_rows(values, scales)
            if rows_mode
            else fp8.dequantize_blocks(values, scales)
        )
        return full[a - first : b - first].to(dtype)

    return Source(entry, read)


def v41_config(args: ModelArgs, hash_config: dict | None) -> dict:
    """V4.1's Engram config names, with our full hash configuration beside them."""
    e = args.engram
    return {
        "engram_layer_ids": [int(i) for i in e.layer_ids],
        "engram_max_ngram_size": e.max_ngram_size,
        "engram_num_heads": e.hash.n_head_per_ngram,
        "engram_head_dim": e.head_dim,
        "engram_vocab_size": [int(v) for v in e.hash.engram_vocab_size],
        "engram_pad_id": e.hash.pad_id,
        "engram_compressed_vocab_size": (hash_config or {}).get("compressed_vocab_size"),
        "engram_seed": e.hash.seed,
        "engram_document_reset": e.document_reset,
        "engram_rms_norm_eps": e.gate_norm_eps,
        "hidden_size": args.dim,
        "hc_mult": args.hc_mult,
        "engram_hash": hash_config,
    }
