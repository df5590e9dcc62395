"""Per-rank memory estimate of a parallelised model (used by ``launch.dry_run``).

Counts come from the real plan applied on the meta device; the activation model is an estimate:
bf16 activations saved for backward per block (mHC streams in float32), SDPA/flash attention (no
T x T term), routed-token copies for MoE, Engram rows and projections, and float32 logits with their
gradient. With activation checkpointing only each block's input streams are kept, plus one block.

Legend: N tokens of one micro-batch, D dim, G hc_mult streams, H heads, V vocab.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from models.args import ModelArgs

GIB = 2**30


@dataclass
class RankCounts:
    dense_params: int  # AdamW-managed parameters held by this rank
    table_params: int  # Engram table rows held by this rank (row-wise Adam)
    table_rows: int
    largest_block_params: int  # what FSDP gathers for one block (0 when not sharded)


@dataclass
class MemoryEstimate:
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    fsdp_buffers_gib: float
    activations_gib: float
    logits_gib: float
    peak_gib: float

    def as_dict(self) -> dict:
        return {k: round(v, 2) for k, v in asdict(self).items()}


def block_activation_bytes(
    args: ModelArgs, tokens: int, layer: int, context_parallel: int = 1
) -> int:
    """Bytes one block saves for backward without recomputation (``tokens`` of this rank;
    ``context_parallel`` ranks share each sequence: attention keeps the keys and values
    gathered from all of them)."""
    d, g, heads = args.dim, args.hc_mult, args.num_heads
    streams = 6 * g * d * 4  # stream inputs, mixes and outputs of two sublayers, float32
    kv = heads * (args.qk_head_dim + args.attn_v_head_dim)  # one token's keys and values
    # q/k/v/out and their pre-projection copies, plus the other cp ranks' keys and values
    attention = 10 * d + 2 * kv + (context_parallel - 1) * kv
    if args.attention == "mla":
        attention += args.kv_lora_rank + args.qk_rope_head_dim + args.q_lora_rank
    if args.is_moe_layer(layer):
        moe = args.moe
        ffn = (
            moe.top_k * (2 * d + 3 * moe.expert_hidden_dim)
            + 3 * moe.expert_hidden_dim * max(moe.num_shared_experts, 0)
            + moe.num_routed_experts
        )
    else:
        ffn = 3 * args.ffn_hidden_dim
    engram = 0
    if args.engram is not None and layer in args.engram.layer_ids:
        e = args.engram
        engram = 2 * e.embed_dim + (g + 1) * d * 3 + g * d * 3
    return tokens * (streams + 2 * (attention + ffn + engram))


def estimate_memory(
    args: ModelArgs,
    counts: RankCounts,
    tokens: int,
    dp_degree: int,
    table_parallel: bool,
    activation_checkpoint: bool,
    context_parallel: int = 1,
) -> MemoryEstimate:
    """Peak bytes per rank for one micro-batch of ``tokens`` tokens on this rank
    (``dp_degree``: the ranks holding different tokens, context-parallel ones included)."""
    params = 4 * (counts.dense_params + counts.table_params)
    heads = args.engram.num_heads if args.engram is not None else 0
    touched = tokens * heads * (1 if table_parallel else dp_degree)
    touched_rows = min(counts.table_rows, touched * (len(args.engram.layer_ids) if heads else 0))
    head_dim = args.engram.head_dim if args.engram is not None else 0
    grads = 4 * counts.dense_params + 8 * touched_rows * head_dim  # sparse: rows + values
    optimizer = 8 * (counts.dense_params + counts.table_params)
    fsdp = 2 * 4 * counts.largest_block_params
    per_block = [
        block_activation_bytes(args, tokens, i, context_parallel) for i in range(args.num_layers)
    ]
    if activation_checkpoint:
        activations = args.num_layers * tokens * args.hc_mult * args.dim * 4 + max(per_block)
    else:
        activations = sum(per_block)
    logits = tokens * args.vocab_size * (2 + 4 + 4)  # bf16 logits, float32 copy and its gradient
    parts = [params, grads, optimizer, fsdp, activations, logits]
    return MemoryEstimate(*(p / GIB for p in parts), peak_gib=sum(parts) / GIB)
