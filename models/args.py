"""Model hyper-parameters: one dataclass tree per model, validated up front.

Every field a user can get wrong is checked in ``ModelArgs.validate`` with a ``ValueError`` that
names the field and the fix, before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from data.ngram_hash import EngramHashSpec


@dataclass
class EngramConfig:
    """Engram hyper-parameters: the hash specification plus the module's own fields."""

    hash: EngramHashSpec = field(default_factory=EngramHashSpec)
    n_embed_per_ngram: int = 512  # width of one n-gram order's rows (split over its heads)
    kernel_size: int = 4  # ShortConv kernel (dilation = max_ngram_size)
    variant: Literal["paper", "v4.1"] = "paper"  # v4.1: no conv, fused kv, fp32 gate
    conv_init: Literal["zero", "reference"] = "zero"  # zero: the paper; reference: the demo's
    sparse_grad: bool = True  # the table produces sparse (touched-row) gradients
    # eps of the gate's key and query RMSNorms; None: PyTorch's default (the reference's).
    # DeepSeek-V4.1 uses 1e-20.
    gate_norm_eps: float | None = None

    @property
    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.hash.layer_ids]

    @property
    def max_ngram_size(self) -> int:
        return self.hash.max_ngram_size

    @property
    def document_reset(self) -> bool:
        return self.hash.document_reset

    @property
    def num_heads(self) -> int:
        return self.hash.num_heads

    @property
    def head_dim(self) -> int:
        return self.n_embed_per_ngram // self.hash.n_head_per_ngram

    @property
    def embed_dim(self) -> int:
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram

    def validate(self, num_layers: int | None = None) -> None:
        self.hash.validate()
        if self.n_embed_per_ngram % self.hash.n_head_per_ngram:
            raise ValueError(
                f"engram.n_embed_per_ngram={self.n_embed_per_ngram} must be divisible by "
                f"engram.hash.n_head_per_ngram={self.hash.n_head_per_ngram}"
            )
        if self.variant not in ("paper", "v4.1"):
            raise ValueError(f"engram.variant={self.variant!r}: use 'paper' or 'v4.1'")
        if self.conv_init not in ("zero", "reference"):
            raise ValueError(f"engram.conv_init={self.conv_init!r}: use 'zero' or 'reference'")
        if self.kernel_size < 1:
            raise ValueError(f"engram.kernel_size={self.kernel_size}: must be >= 1")
        if num_layers is not None:
            bad = [i for i in self.layer_ids if not 0 <= i < num_layers]
            if bad:
                raise ValueError(
                    f"engram.hash.layer_ids={self.layer_ids}: ids {bad} are out of range for "
                    f"{num_layers} layers (0-indexed)"
                )

    def table_sizes(self) -> dict[int, list[int]]:
        """Flat per-head prime sizes for every Engram layer (order-major)."""
        return {layer: self.hash.table_sizes(layer) for layer in self.layer_ids}


@dataclass
class MoEArgs:
    """Fine-grained MoE with shared experts (DeepSeek-V3 style)."""

    num_routed_experts: int = 8
    num_shared_experts: int = 1
    top_k: int = 2
    expert_hidden_dim: int = 256
    score_func: str = "sigmoid"  # "sigmoid" (DeepSeek-V3) or "softmax"
    normalize_weights: bool = True
    route_scale: float = 1.0
    # group-limited routing (DeepSeek-V3): experts in n_group groups, only the topk_group groups
    # with the best two-expert score sums are eligible; 1 and 1 = plain top-k
    n_group: int = 1
    topk_group: int = 1
    bias_update_speed: float = 1e-3  # auxiliary-loss-free balancing; 0 disables
    seq_aux_loss_coef: float = 0.0  # optional sequence-level balance loss
    use_grouped_mm: bool = True


@dataclass
class YarnArgs:
    """YaRN RoPE scaling (factor 1 = off). Names follow the HF ``rope_scaling`` keys."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class ModelArgs:
    """A DeepSeek-style decoder: MLA/GQA attention, dense-then-MoE FFNs, mHC, Engram layers."""

    vocab_size: int = 16384
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    attention: str = "gqa"  # "gqa" or "mla"
    num_kv_heads: int = 4  # GQA
    head_dim: int = 64  # GQA
    q_lora_rank: int = 0  # MLA; 0 = no query compression
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    ffn_hidden_dim: int = 768  # dense FFN layers
    num_dense_layers: int = 1  # the first layers use a dense FFN, as in DeepSeek
    moe: MoEArgs | None = field(default_factory=MoEArgs)
    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20
    engram: EngramConfig | None = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    yarn: YarnArgs = field(default_factory=YarnArgs)
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    document_mask: bool = True  # packed documents do not attend across boundaries
    # "auto": flex_attention block masks on CUDA (no dense mask), SDPA with a dense mask elsewhere
    attention_backend: str = "auto"

    @property
    def qk_head_dim(self) -> int:
        return (
            self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.attention == "mla"
            else self.head_dim
        )

    @property
    def attn_v_head_dim(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe is not None and layer_id >= self.num_dense_layers

    def validate(self) -> None:
        checks = [
            (self.vocab_size > 0, "model.vocab_size must be > 0"),
            (self.dim > 0 and self.num_layers > 0, "model.dim and model.num_layers must be > 0"),
            (
                self.attention in ("gqa", "mla"),
                f"model.attention={self.attention!r}: use 'gqa' or 'mla'",
            ),
            (self.hc_mult >= 1, f"model.hc_mult={self.hc_mult}: must be >= 1"),
            (
                self.attention_backend in ("auto", "sdpa", "flex"),
                f"model.attention_backend={self.attention_backend!r}: use 'auto', 'sdpa' or 'flex'",
            ),
            (
                0 <= self.num_dense_layers <= self.num_layers,
                f"model.num_dense_layers={self.num_dense_layers}: must be in [0, num_layers]",
            ),
        ]
        if self.attention == "gqa":
            checks.append(
                (
                    self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
                    f"model.num_heads={self.num_heads} must be divisible by model.num_kv_heads="
                    f"{self.num_kv_heads}",
                )
            )
            checks.append(
                (self.head_dim % 2 == 0, f"model.head_dim={self.head_dim} must be even (RoPE)")
            )
        else:
            checks.append(
                (
                    self.qk_rope_head_dim % 2 == 0,
                    f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE)",
                )
            )
            checks.append((self.kv_lora_rank > 0, "model.kv_lora_rank must be > 0 for MLA"))
        if self.moe is not None:
            moe = self.moe
            checks.append((moe.num_routed_experts > 0, "model.moe.num_routed_experts must be > 0"))
            checks.append(
                (
                    1 <= moe.top_k <= moe.num_routed_experts,
                    f"model.moe.top_k={moe.top_k} must be in [1, num_routed_experts="
                    f"{moe.num_routed_experts}]",
                )
            )
            checks.append(
                (
                    moe.n_group >= 1
                    and moe.num_routed_experts % moe.n_group == 0
                    and (moe.n_group == 1 or moe.num_routed_experts // moe.n_group >= 2)
                    and 1 <= moe.topk_group <= moe.n_group
                    and moe.top_k <= moe.topk_group * (moe.num_routed_experts // moe.n_group),
                    f"model.moe.n_group={moe.n_group}, topk_group={moe.topk_group}: n_group must "
                    f"divide num_routed_experts={moe.num_routed_experts} into groups of 2 or "
                    "more, 1 <= topk_group <= "
                    "n_group, and the kept groups must hold at least top_k experts",
                )
            )
            checks.append(
                (
                    moe.score_func in ("sigmoid", "softmax"),
                    f"model.moe.score_func={moe.score_func!r}: use 'sigmoid' or 'softmax'",
                )
            )
        if self.yarn.factor < 1:
            checks.append((False, f"model.yarn.factor={self.yarn.factor}: must be >= 1 (1 = off)"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.engram is not None:
            self.engram.validate(num_layers=self.num_layers)


def _known(cls, values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def model_args_to_dict(args: ModelArgs) -> dict:
    """Plain JSON-able fields of ``args`` (checkpoints' ``meta.json``, exported configs)."""
    return dataclasses.asdict(args)


def model_args_from_dict(values: dict) -> ModelArgs:
    """Inverse of ``model_args_to_dict``."""
    values = dict(values)
    moe, yarn, engram = (
        values.pop("moe", None),
        values.pop("yarn", None),
        values.pop("engram", None),
    )
    args = ModelArgs(**_known(ModelArgs, values))
    args.moe = None if moe is None else MoEArgs(**_known(MoEArgs, moe))
    args.yarn = YarnArgs(**_known(YarnArgs, yarn or {}))
    if engram is not None:
        engram = dict(engram)
        spec = EngramHashSpec.from_dict(engram.pop("hash"))
        args.engram = EngramConfig(hash=spec, **_known(EngramConfig, engram))
    else:
        args.engram = None
    return args
