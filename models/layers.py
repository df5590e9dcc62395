"""Basic layers: RMSNorm, RoPE with YaRN scaling, SwiGLU FFN, and attention masks.

YaRN follows Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models"
(2023), in the DeepSeek-V3 arrangement (frequency ramp between beta_fast and beta_slow, mscale on
the softmax).

Legend: B batch, T sequence, H heads, Dr rotary dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.args import YarnArgs
from models.sharded_init import trunc_normal_

RMSNorm = nn.RMSNorm


def _correction_dim(num_rotations: float, dim: int, theta: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_inv_freq(dim: int, theta: float, yarn: YarnArgs) -> torch.Tensor:
    """Inverse frequencies ``[Dr/2]``, YaRN-interpolated when ``yarn.factor > 1``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if yarn.factor <= 1:
        return inv_freq.float()
    low = max(
        math.floor(
            _correction_dim(yarn.beta_fast, dim, theta, yarn.original_max_position_embeddings)
        ),
        0,
    )
    high = min(
        math.ceil(
            _correction_dim(yarn.beta_slow, dim, theta, yarn.original_max_position_embeddings)
        ),
        dim - 1,
    )
    ramp = (torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)
    keep = 1 - ramp.clamp(0, 1)  # 1: high-frequency dims kept, 0: interpolated by the factor
    return (inv_freq / yarn.factor * (1 - keep) + inv_freq * keep).float()


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by per-token positions (packing restarts positions per document),
    at the full rotary width in the interleaved layout: ``cos`` repeats each pair's cosine,
    ``sin`` holds ``(-sin, +sin)`` for each pair, so that ``apply_rotary`` is two products and a
    sum (fewer kernels than rotating the pairs apart)."""

    def __init__(self, dim: int, max_seq_len: int, theta: float, yarn: YarnArgs):
        super().__init__()
        self.dim, self.max_seq_len, self.theta, self.yarn = dim, max_seq_len, theta, yarn
        self.register_buffer("cos", torch.empty(max_seq_len, dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dim), persistent=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The non-persistent cos/sin tables (recomputed after a meta build or a load)."""
        freqs = torch.outer(
            torch.arange(self.max_seq_len, dtype=torch.float32),
            rope_inv_freq(self.dim, self.theta, self.yarn),
        )
        self.cos.copy_(freqs.cos().repeat_interleave(2, dim=-1))
        self.sin.copy_(torch.stack((-freqs.sin(), freqs.sin()), dim=-1).flatten(-2))

    def init_weights(self) -> None:
        self.init_buffers()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, T] -> [B, T, 1, Dr] each: one row for every head
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(e, o)`` of ``x [B, T, H, Dr]`` to ``(e c - o s, o c + e s)``
    with ``RotaryEmbedding``'s tables ``[B, T, 1, Dr]``, in float32."""
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (o, e) for each pair
    return (x32 * cos + swapped * sin).type_as(x)


class FeedForward(nn.Module):
    """SwiGLU FFN: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        trunc_normal_(self.w1.weight, std=std)
        trunc_normal_(self.w3.weight, std=std)
        trunc_normal_(self.w2.weight, std=out_std)


def doc_ids_from_positions(positions: torch.Tensor) -> torch.Tensor:
    """Document ids ``[B, T]`` from positions that restart at 0 at every document start."""
    return (positions == 0).cumsum(dim=1)


@dataclass
class AttentionMask:
    """Causal attention, plus document boundaries, for one batch (built once per forward).

    ``block``: a flex_attention ``BlockMask`` (fully masked blocks are skipped, nothing dense is
    built); ``dense``: a boolean ``[B, 1, Tq, Tk]`` mask for SDPA (the fallback); neither: plain
    causal (SDPA's ``is_causal``, the flash kernel). ``sequence``: where the keys and values
    come from (context parallelism gathers them from every rank; None: the local sequence).
    """

    dense: torch.Tensor | None = None
    block: object = None
    sequence: object = None


def attention_mask(doc_ids: torch.Tensor | None, backend: str = "sdpa") -> AttentionMask:
    """The mask of causal attention within documents (``doc_ids [B, T]``; None: causal only).

    ``backend``: "flex" builds a block mask from the document ids, "sdpa" a dense mask.
    """
    if doc_ids is None:
        return AttentionMask()
    return _mask(doc_ids, doc_ids, None, backend, None)


def context_mask(
    positions: torch.Tensor, doc_ids: torch.Tensor | None, documents: bool, backend: str, sequence
) -> AttentionMask:
    """Context parallelism: this rank's queries against the whole gathered sequence.

    ``positions``/``doc_ids`` ``[B, L]`` are the local shares; ``documents``: mask across
    document boundaries too (doc ids None: derived from the whole row's positions, where the
    documents really start). ``sequence``: the ``ContextParallelSequence``.
    """
    query_index = sequence.query_index(positions.shape[1], positions.device)
    if not documents:
        doc_ids = torch.zeros_like(positions)
        key_docs = sequence.gather_ids(doc_ids)
    elif doc_ids is None:
        key_docs = doc_ids_from_positions(sequence.gather_ids(positions))
        doc_ids = key_docs[:, query_index]
    else:
        key_docs = sequence.gather_ids(doc_ids)
    return _mask(doc_ids, key_docs, query_index, backend, sequence)


def _mask(query_docs, key_docs, query_index, backend: str, sequence) -> AttentionMask:
    """Causal and same-document; ``query_index`` ``[Tq]``: each query's index among the keys
    (None: the queries are the keys)."""
    batch, num_q = query_docs.shape
    num_k = key_docs.shape[1]
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        if query_index is None:

            def causal_same_document(b, h, q, kv):
                return (q >= kv) & (query_docs[b, q] == key_docs[b, kv])

        else:

            def causal_same_document(b, h, q, kv):
                return (query_index[q] >= kv) & (query_docs[b, q] == key_docs[b, kv])

        block = create_block_mask(
            causal_same_document, batch, None, num_q, num_k, device=query_docs.device
        )
        return AttentionMask(block=block, sequence=sequence)
    if query_index is None:
        causal = torch.ones(num_q, num_k, dtype=torch.bool, device=query_docs.device).tril()
    else:
        keys = torch.arange(num_k, device=query_docs.device)
        causal = query_index.unsqueeze(1) >= keys.unsqueeze(0)  # [Tq, Tk]
    same_doc = query_docs.unsqueeze(2) == key_docs.unsqueeze(1)  # [B, Tq, Tk]
    return AttentionMask(dense=(same_doc & causal).unsqueeze(1), sequence=sequence)


def resolve_attention_backend(backend: str, device: torch.device) -> str:
    """ "auto": flex on CUDA (compiled block-sparse kernels), SDPA elsewhere (flex has no CPU
    backward)."""
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return backend
