"""Named model sizes, picked by ``model.flavor``; every family has a CPU-sized ``debug``.
The derivation of the paper flavors is in docs/model_flavors.md.

``debug`` trains in seconds on CPU, ``demo`` is the CPU main job, ``ladder-*`` are small experiment
sizes, and ``dense-4b`` / ``moe-27b`` / ``engram-27b`` / ``engram-40b`` are the paper's models
(30 blocks, hidden 2560, MLA with 32 heads, 4-stream mHC, DeepSeek-V3 vocabulary).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

from data.ngram_hash import EngramHashSpec
from models.args import EngramConfig, ModelArgs, MoEArgs

DEEPSEEK_V3_VOCAB = 129280  # the model's embedding rows (the tokenizer has 128,815 ids)


def _debug() -> ModelArgs:
    return ModelArgs(
        vocab_size=DEEPSEEK_V3_VOCAB,
        dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn_hidden_dim=192,
        num_dense_layers=1,
        max_seq_len=128,
        hc_mult=2,
        moe=MoEArgs(num_routed_experts=4, num_shared_experts=1, top_k=2, expert_hidden_dim=64),
        engram=EngramConfig(
            hash=EngramHashSpec(layer_ids=[0], engram_vocab_size=[2003, 2003], n_head_per_ngram=2),
            n_embed_per_ngram=32,
            kernel_size=4,
        ),
    )


def _demo() -> ModelArgs:
    return ModelArgs(
        vocab_size=DEEPSEEK_V3_VOCAB,
        dim=256,
        num_layers=4,
        num_heads=4,
        attention="mla",
        q_lora_rank=0,
        kv_lora_rank=128,
        qk_nope_head_dim=48,
        qk_rope_head_dim=16,
        v_head_dim=48,
        ffn_hidden_dim=768,
        num_dense_layers=1,
        max_seq_len=256,
        hc_mult=2,
        moe=MoEArgs(num_routed_experts=8, num_shared_experts=1, top_k=2, expert_hidden_dim=256),
        engram=EngramConfig(
            hash=EngramHashSpec(
                layer_ids=[0, 2], engram_vocab_size=[30011, 30011], n_head_per_ngram=4
            ),
            n_embed_per_ngram=128,
            kernel_size=4,
        ),
    )


def _debug_v3() -> ModelArgs:
    """Small DeepSeek-V3 shape (MLA, sigmoid-routed MoE with group-limited routing and routed
    scaling, one stream, no Engram): exports to transformers' native DeepseekV3ForCausalLM."""
    return ModelArgs(
        vocab_size=DEEPSEEK_V3_VOCAB,
        dim=64,
        num_layers=2,
        num_heads=4,
        attention="mla",
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        ffn_hidden_dim=192,
        num_dense_layers=1,
        max_seq_len=128,
        hc_mult=1,
        moe=MoEArgs(
            num_routed_experts=8,
            num_shared_experts=1,
            top_k=2,
            expert_hidden_dim=64,
            route_scale=2.5,
            n_group=2,
            topk_group=1,
        ),
        engram=None,
    )


def v41_flash_engram() -> EngramConfig:
    """DeepSeek-V4.1-Flash's Engram (public serving code and safetensors headers): layers 1 and
    14, N = 4, 8 heads of dim 256 per order, prime base 16,000,000 (about 384 M rows per layer),
    fused key/value, no conv, gate RMSNorm eps 1e-20, look-back stopping at document starts."""
    return EngramConfig(
        hash=EngramHashSpec(
            layer_ids=[1, 14],
            engram_vocab_size=[16_000_000] * 3,
            max_ngram_size=4,
            n_head_per_ngram=8,
            document_reset=True,
        ),
        n_embed_per_ngram=8 * 256,
        variant="v4.1",
        gate_norm_eps=1e-20,
    )


def _debug_v41() -> ModelArgs:
    """``debug`` with V4.1-Flash's Engram settings (small tables): N = 4, head dim 256."""
    args = _debug()
    engram = v41_flash_engram()
    engram.hash.layer_ids = [0]
    engram.hash.engram_vocab_size = [2003] * 3
    args.engram = engram
    return args


def _ladder(dim: int, layers: int, experts: int, engram: bool) -> Callable[[], ModelArgs]:
    def build() -> ModelArgs:
        return ModelArgs(
            vocab_size=DEEPSEEK_V3_VOCAB,
            dim=dim,
            num_layers=layers,
            num_heads=dim // 64,
            attention="mla",
            q_lora_rank=0,
            kv_lora_rank=dim // 2,
            qk_nope_head_dim=48,
            qk_rope_head_dim=16,
            v_head_dim=48,
            ffn_hidden_dim=3 * dim,
            num_dense_layers=1,
            max_seq_len=1024,
            hc_mult=4,
            moe=MoEArgs(
                num_routed_experts=experts, num_shared_experts=1, top_k=2, expert_hidden_dim=dim
            ),
            engram=EngramConfig(
                hash=EngramHashSpec(
                    layer_ids=[1, layers // 2], engram_vocab_size=[50021, 50021], n_head_per_ngram=4
                ),
                n_embed_per_ngram=dim // 2,
            )
            if engram
            else None,
        )

    return build


def _paper_backbone(**overrides) -> ModelArgs:
    args = ModelArgs(
        vocab_size=DEEPSEEK_V3_VOCAB,
        dim=2560,
        num_layers=30,
        num_heads=32,
        attention="mla",
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        ffn_hidden_dim=18432,
        num_dense_layers=1,
        max_seq_len=4096,
        hc_mult=4,
        moe=MoEArgs(num_routed_experts=72, num_shared_experts=1, top_k=6, expert_hidden_dim=1536),
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _paper_engram(rows_per_head: int) -> EngramConfig:
    # layers 2 and 15 (1-indexed), N=3, 8 heads, 1280 dims per n-gram order (160 per head)
    return EngramConfig(
        hash=EngramHashSpec(
            layer_ids=[1, 14],
            engram_vocab_size=[rows_per_head, rows_per_head],
            max_ngram_size=3,
            n_head_per_ngram=8,
        ),
        n_embed_per_ngram=1280,
        kernel_size=4,
    )


def _dense_4b() -> ModelArgs:
    return _paper_backbone(moe=None, num_dense_layers=30, ffn_hidden_dim=11008)


def _moe_27b() -> ModelArgs:
    return _paper_backbone()


def _engram(rows_per_head: int) -> Callable[[], ModelArgs]:
    def build() -> ModelArgs:
        # 72 -> 55 routed experts; Engram's 65.6M activated projection params are paid for by a
        # narrower first dense FFN (18432 -> 9856) so the model stays iso-FLOP with MoE-27B.
        args = _paper_backbone(ffn_hidden_dim=9856, engram=_paper_engram(rows_per_head))
        args.moe.num_routed_experts = 55
        return args

    return build


FLAVORS: dict[str, Callable[[], ModelArgs]] = {
    "debug": _debug,
    "demo": _demo,
    "debug-v3": _debug_v3,
    "debug-v41": _debug_v41,
    "ladder-moe-xs": _ladder(128, 4, 8, engram=False),
    "ladder-engram-xs": _ladder(128, 4, 6, engram=True),
    "ladder-moe-s": _ladder(256, 6, 16, engram=False),
    "ladder-engram-s": _ladder(256, 6, 12, engram=True),
    "ladder-moe-m": _ladder(512, 8, 16, engram=False),
    "ladder-engram-m": _ladder(512, 8, 12, engram=True),
    "dense-4b": _dense_4b,
    "moe-27b": _moe_27b,
    "engram-27b": _engram(1_130_000),
    "engram-40b": _engram(3_630_000),
}


def get_flavor(name: str) -> ModelArgs:
    """A fresh copy of a named flavor's arguments."""
    if name not in FLAVORS:
        raise ValueError(f"model.flavor={name!r} is unknown; choose one of {sorted(FLAVORS)}")
    return copy.deepcopy(FLAVORS[name]())


def apply_overrides(args: ModelArgs, overrides: dict) -> ModelArgs:
    """Set ``ModelArgs`` fields from ``{"dim": 128, "moe.top_k": 4, "engram.hash.seed": 1}``."""
    for dotted, value in overrides.items():
        target, parts = args, dotted.split(".")
        for part in parts[:-1]:
            target = getattr(target, part, None)
            if target is None:
                raise ValueError(f"model.overrides.{dotted}: {part!r} is not set in this flavor")
        derived = isinstance(getattr(type(target), parts[-1], None), property)
        if derived or not hasattr(target, parts[-1]):
            hint = ""
            for child in dataclasses.fields(target) if dataclasses.is_dataclass(target) else ():
                if dataclasses.is_dataclass(getattr(target, child.name)) and hasattr(
                    getattr(target, child.name), parts[-1]
                ):
                    hint = f"; did you mean model.overrides.{'.'.join(parts[:-1] + [child.name])}"
                    hint += f".{parts[-1]}?"
            raise ValueError(
                f"model.overrides.{dotted}: unknown field {parts[-1]!r} of "
                f"{type(target).__name__}{hint}"
            )
        setattr(target, parts[-1], value)
    return args


def resolve_model_args(
    flavor: str,
    overrides: dict | None = None,
    *,
    vocab_size: int = 0,
    tokenizer_vocab_size: int | None = None,
    pad_id: int | None = None,
    seq_len: int | None = None,
) -> ModelArgs:
    """The one way a job turns ``[model]`` into ``ModelArgs`` (train, dry run, summary).

    Args:
        flavor, overrides: ``model.flavor`` and ``model.overrides``.
        vocab_size: ``model.vocab_size`` (0: the tokenizer's, else the flavor's).
        tokenizer_vocab_size, pad_id: the job's tokenizer, when there is one: the embedding must
            cover it, and Engram pads with its pad id unless ``engram.hash.pad_id`` is overridden.
        seq_len: ``data.seq_len``, checked against ``max_seq_len``.
    """
    overrides = overrides or {}
    args = apply_overrides(get_flavor(flavor), overrides)
    args.vocab_size = vocab_size or tokenizer_vocab_size or args.vocab_size
    if tokenizer_vocab_size is not None and args.vocab_size < tokenizer_vocab_size:
        raise ValueError(
            f"model.vocab_size={args.vocab_size} is below the tokenizer's "
            f"{tokenizer_vocab_size}; raise it or set 0 (use the tokenizer's)"
        )
    if args.engram is not None and pad_id is not None and "engram.hash.pad_id" not in overrides:
        args.engram.hash.pad_id = pad_id
    if seq_len is not None and seq_len > args.max_seq_len:
        raise ValueError(
            f"data.seq_len={seq_len} exceeds the flavor's max_seq_len={args.max_seq_len}; "
            f"lower data.seq_len or set --model.overrides.max_seq_len={seq_len}"
        )
    args.validate()
    return args
