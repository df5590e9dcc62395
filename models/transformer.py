"""The DeepSeek-style decoder: embedding, blocks (Engram -> attention -> FFN/MoE, all on mHC
streams), final norm, LM head. Plain PyTorch; parallelism is applied from outside
(``models.parallelize``).

Legend: B batch, T sequence, G hc_mult streams, D dim, V vocab, K Engram heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from data.batch import EngramInputs
from models.args import ModelArgs
from models.attention import build_attention
from models.engram import Engram
from models.hyper_connections import HyperConnection, StreamMerge
from models.kv_cache import KVCache
from models.layers import (
    FeedForward,
    RMSNorm,
    RotaryEmbedding,
    attention_mask,
    context_mask,
    doc_ids_from_positions,
    resolve_attention_backend,
)
from models.moe import MoE
from models.sequence import LOCAL_SEQUENCE
from models.sharded_init import normal_, trunc_normal_


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # added to the loss


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, engram_table_sizes: list[int] | None):
        super().__init__()
        self.layer_id = layer_id
        self.engram = (
            Engram(args.engram, layer_id, args.dim, args.hc_mult, engram_table_sizes)
            if engram_table_sizes is not None
            else None
        )
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = build_attention(args)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.moe = MoE(args.dim, args.moe) if args.is_moe_layer(layer_id) else None
        self.feed_forward = (
            None if self.moe is not None else FeedForward(args.dim, args.ffn_hidden_dim)
        )
        self.attn_hc = HyperConnection(args.dim, args.hc_mult, args.hc_sinkhorn_iters)
        self.ffn_hc = HyperConnection(args.dim, args.hc_mult, args.hc_sinkhorn_iters)
        self.init_std = 0.02
        self.out_std = 0.02 / math.sqrt(2 * args.num_layers)

    def forward(self, x, rope, mask, engram: EngramInputs | None = None, cache=None):
        """``x [B, T, G, D]`` -> ``(x [B, T, G, D], seq_aux_loss or None)``; ``cache``: this
        layer's ``LayerCache`` when decoding incrementally."""
        if self.engram is not None:
            if engram is None:
                raise ValueError(
                    f"layer {self.layer_id} has Engram but the batch has no Engram inputs for it"
                )
            x = x + self.engram(x, engram, cache=cache)  # keyword: TP plans lay out positionals
        h, ctx = self.attn_hc.pre(x)
        attended = self.attention(self.attention_norm(h), rope, mask, cache=cache)
        x = self.attn_hc.post(x, attended, ctx)
        h, ctx = self.ffn_hc.pre(x)
        aux = None
        if self.moe is not None:
            out, aux = self.moe(self.ffn_norm(h))
        else:
            out = self.feed_forward(self.ffn_norm(h))
        return self.ffn_hc.post(x, out, ctx), aux

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.engram is not None:
            self.engram.init_weights(self.init_std)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.init_std, self.out_std)
        ffn = self.moe if self.moe is not None else self.feed_forward
        ffn.init_weights(self.init_std, self.out_std)
        self.attn_hc.init_weights()
        self.ffn_hc.init_weights()


class Transformer(nn.Module):
    """``forward(tokens, *, positions, doc_ids, engram) -> ModelOutput``.

    ``engram`` maps an Engram layer id to its ``EngramInputs`` (hash ids and lookup plan, from the
    loader; bare ``[B, T, K]`` hash ids are accepted too). Layers live in a ``ModuleDict`` keyed by
    layer id so pipeline stages can drop the ones they do not own.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        sizes = args.engram.table_sizes() if args.engram is not None else {}
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        rope_dim = args.qk_rope_head_dim if args.attention == "mla" else args.head_dim
        self.rope = RotaryEmbedding(rope_dim, args.max_seq_len, args.rope_theta, args.yarn)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args, sizes.get(i)) for i in range(args.num_layers)}
        )
        self.merge = StreamMerge(args.dim, args.hc_mult)
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # the sequence seam: context parallelism swaps in its sharded sequence
        self.sequence = LOCAL_SEQUENCE

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        engram: dict[int, EngramInputs | torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """``cache``: incremental decoding; ``tokens`` are the positions after the cached ones
        (one document; ``engram`` from ``cache.hash_ids``), and the cache advances past them."""
        batch, seq = tokens.shape[:2]  # token ids [B, T], or streams [B, T, G, D] on later stages
        total = seq * self.sequence.degree + (cache.length if cache is not None else 0)
        if total > self.args.max_seq_len:  # whole rows under cp, the cached positions too
            raise ValueError(
                f"sequence length {total} exceeds model.max_seq_len={self.args.max_seq_len}"
            )
        positions, mask = self._positions_and_mask(tokens, positions, doc_ids, cache)
        rope = self.rope(positions)
        x = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if x.dim() == 3:  # [B, T, D] -> [B, T, G, D]: every stream starts as the embedding
            x = x.unsqueeze(2).expand(-1, -1, self.args.hc_mult, -1)
        aux_total = None
        for layer in self.layers.values():
            inputs = None if engram is None else engram.get(layer.layer_id)
            layer_cache = None if cache is None else cache.layer(layer.layer_id)
            x, aux = layer(x, rope, mask, inputs, layer_cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None:
            cache.length += seq
        if self.norm is None:  # a pipeline stage without the head passes the streams on
            return ModelOutput(x)
        logits = self.output(self.norm(self.merge(x)))
        aux_losses = {} if aux_total is None else {"moe_seq_aux": aux_total}
        return ModelOutput(logits, aux_losses)

    def _positions_and_mask(self, tokens, positions, doc_ids, cache: KVCache | None):
        """Positions ``[B, T]`` (given, after the cache, or the local sequence's) and the
        attention mask: causal within documents, over this rank's chunks under context
        parallelism, or after the cached positions when decoding."""
        batch, seq = tokens.shape[:2]
        if cache is not None:
            return cache.positions(batch, seq, tokens.device), cache.attention_mask(
                seq, tokens.device
            )
        if positions is None:
            positions = self.sequence.query_index(seq, tokens.device).expand(batch, seq)
        backend = resolve_attention_backend(self.args.attention_backend, tokens.device)
        if self.sequence.degree > 1:  # context parallelism: this rank holds chunks of each row
            mask = context_mask(positions, doc_ids, self.args.document_mask, backend, self.sequence)
            return positions, mask
        if doc_ids is None and self.args.document_mask:  # documents restart their positions
            doc_ids = doc_ids_from_positions(positions)
        return positions, attention_mask(doc_ids if self.args.document_mask else None, backend)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic init after ``to_empty()``: the model is built on the meta device and
        sharded first, so no rank ever holds it whole.

        One draw from the global RNG gives a base seed; the embedding, every block and the head are
        then initialised from their own seeds, so a pipeline stage holding only some blocks gets the
        same weights as the whole model.
        """
        base = int(torch.randint(0, 2**31 - 1, ()).item())

        def seeded(index: int):
            torch.manual_seed(base + 7919 * index)

        self.rope.init_weights()
        with torch.random.fork_rng(devices=[]):
            if self.tok_embeddings is not None:
                seeded(0)
                normal_(self.tok_embeddings.weight)
            for layer in self.layers.values():
                seeded(1 + layer.layer_id)
                layer.init_weights()
            if self.norm is not None:
                seeded(1 + self.args.num_layers)
                self.merge.init_weights()
                self.norm.reset_parameters()
                if not self.args.tie_embeddings:
                    cutoff = 3 * self.args.dim**-0.5
                    trunc_normal_(self.output.weight, std=self.args.dim**-0.5, a=-cutoff, b=cutoff)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the non-persistent buffers (RoPE tables, table offsets, the mHC prior,
        router counts): what a load of the state dict alone leaves unset."""
        for module in self.modules():
            if module is not self and hasattr(module, "init_buffers"):
                module.init_buffers()

    def moe_layers(self) -> list[MoE]:
        return [layer.moe for layer in self.layers.values() if layer.moe is not None]

    def engram_layers(self) -> list[Engram]:
        return [layer.engram for layer in self.layers.values() if layer.engram is not None]

    @torch.no_grad()
    def update_moe_biases(self) -> None:
        """Auxiliary-loss-free balancing step; call after each optimizer step."""
        for moe in self.moe_layers():
            moe.router.update_bias()


def build_model(args: ModelArgs, device: str | torch.device = "cpu", seed: int = 0) -> Transformer:
    """Build on meta, materialise on ``device``, then run the deterministic init."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model
