"""Exact parameter and FLOP accounting from the config, cross-checked against a meta-device model.

Conventions (documented in docs/model_flavors.md):
- ``total_params``: every parameter, Engram tables included.
- ``engram_params``: everything inside Engram modules (tables, projections, norms, conv).
- ``activated_params``: parameters that take part in one token's compute: total minus the input
  embedding, minus the Engram tables (a lookup is not compute), minus the routed experts not chosen.
  This is the paper's convention (Dense-4B: 4.1B total, 3.8B activated = total minus the embedding).
- ``flops_per_token`` (training, forward + backward): ``6 * activated matmul params``
  + attention ``6 * L * H * (Dqk + Dv) * seq_len`` (torchtitan's convention, no causal halving)
  + Engram gate dot products ``6 * G * D`` per Engram layer. Table lookups count 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.args import ModelArgs


@dataclass
class Accounting:
    total_params: int
    activated_params: int
    engram_params: int
    engram_table_params: int
    embedding_params: int
    flops_per_token: int
    seq_len: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _attention_params(a: ModelArgs) -> int:
    d, h = a.dim, a.num_heads
    if a.attention == "gqa":
        return d * h * a.head_dim + 2 * d * a.num_kv_heads * a.head_dim + h * a.head_dim * d
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * h * qk if a.q_lora_rank else d * h * qk
    kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
    kv += a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + h * a.v_head_dim * d


def _hc_params(a: ModelArgs) -> int:
    g = a.hc_mult
    return 0 if g == 1 else g * a.dim * (2 * g + g * g) + 2 * g + g * g + 3


def _engram_params(a: ModelArgs, rows: int) -> tuple[int, int]:
    """(non-table params, table params) of one Engram layer."""
    e, g, d = a.engram, a.hc_mult, a.dim
    norms = 2 * g * d
    if e.variant == "paper":
        proj = (g + 1) * (e.embed_dim * d + d)
        conv = g * d * e.kernel_size + g * d
    else:
        proj, conv = e.embed_dim * (g + 1) * d, 0
    return proj + norms + conv, rows * e.head_dim


def account(a: ModelArgs, seq_len: int | None = None) -> Accounting:
    seq_len = seq_len or a.max_seq_len
    d = a.dim
    embedding = a.vocab_size * d
    head = 0 if a.tie_embeddings else a.vocab_size * d
    total = (
        embedding + head + d + (a.hc_mult * d * a.hc_mult + a.hc_mult + 1 if a.hc_mult > 1 else 0)
    )
    inactive = 0
    norm_like = d  # non-matmul parameters inside the activated set (norms, biases, statics)
    engram_total = engram_tables = 0
    rows = a.engram.table_sizes() if a.engram is not None else {}
    for layer in range(a.num_layers):
        total += 2 * d + _attention_params(a) + 2 * _hc_params(a)
        norm_like += 2 * d + (a.kv_lora_rank + a.q_lora_rank if a.attention == "mla" else 0)
        if a.is_moe_layer(layer):
            m = a.moe
            expert = 3 * d * m.expert_hidden_dim
            total += m.num_routed_experts * d + m.num_routed_experts * expert
            total += expert * m.num_shared_experts
            inactive += (m.num_routed_experts - m.top_k) * expert
        else:
            total += 3 * d * a.ffn_hidden_dim
        if layer in rows:
            other, table = _engram_params(a, sum(rows[layer]))
            total += other + table
            engram_total += other + table
            engram_tables += table
    activated = total - embedding - engram_tables - inactive
    flops = 6 * (activated - norm_like)
    flops += 6 * a.num_layers * a.num_heads * (a.qk_head_dim + a.attn_v_head_dim) * seq_len
    flops += 6 * a.hc_mult * d * len(rows)
    return Accounting(total, activated, engram_total, engram_tables, embedding, flops, seq_len)


def count_meta_params(model) -> dict[str, int]:
    """Parameter counts of a (meta-device) model by category, for cross-checking ``account``."""
    total = engram = tables = 0
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if ".engram." in f".{name}":
            engram += param.numel()
            if name.endswith("table.weight"):
                tables += param.numel()
    return {"total_params": total, "engram_params": engram, "engram_table_params": tables}
