"""The decoding state of a batch of sequences: what incremental generation carries between
forwards of the same model that trains (the math is never restated for decoding).

Per layer a ``LayerCache`` holds what attention needs of earlier positions (GQA's rotated keys
and values; MLA's normed compressed latent and its shared rotated rope key, from which each step
rebuilds the heads' keys and values) and the Engram ShortConv's left context (the normed inputs of
the last ``(kernel - 1) * dilation`` positions). The cache itself holds the number of positions
seen and the last N-1 raw token ids, so each new token is hashed from its own n-gram window by the
loader's hasher (``data.ngram_hash.NgramHasher``) rather than by a second copy of the hash.

Legend: B batch, P cached positions, T new positions, K Engram heads.
"""

from __future__ import annotations

import numpy as np
import torch

from models.layers import AttentionMask


class LayerCache:
    """One layer's tensors of earlier positions, each ``[B, P, ...]`` (sequence on dim 1)."""

    def __init__(self):
        self.tensors: tuple[torch.Tensor, ...] | None = None
        self.conv_context: torch.Tensor | None = None  # [B, W, C] Engram ShortConv inputs

    def extend(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append the new positions' tensors ``[B, T, ...]``; returns all positions' ``[B, P+T,
        ...]``."""
        if self.tensors is None:
            self.tensors = tuple(new)
        else:
            self.tensors = tuple(
                torch.cat([old, add], dim=1) for old, add in zip(self.tensors, new, strict=True)
            )
        return self.tensors


class KVCache:
    """The decoding state of ``B`` sequences that all start at position 0.

    ``Transformer.forward(tokens, cache=...)`` runs the new positions after the cached ones and
    advances ``length``; ``hash_ids`` gives the new positions' Engram ids.
    """

    def __init__(self):
        self.length = 0  # positions already run
        self.layers: dict[int, LayerCache] = {}
        self.tokens: np.ndarray | None = None  # [B, <= N-1] the last raw ids, for hashing

    def layer(self, layer_id: int) -> LayerCache:
        if layer_id not in self.layers:
            self.layers[layer_id] = LayerCache()
        return self.layers[layer_id]

    def attention_mask(self, num_new: int, device) -> AttentionMask:
        """New query ``i`` (position ``length + i``) sees every cached key and the new ones up to
        itself; with nothing cached this is plain causal attention."""
        if self.length == 0:
            return AttentionMask()
        rows = torch.arange(num_new, device=device).unsqueeze(1) + self.length
        keys = torch.arange(self.length + num_new, device=device).unsqueeze(0)
        return AttentionMask(dense=keys <= rows)  # [T, P+T], broadcast over batch and heads

    def positions(self, batch: int, num_new: int, device) -> torch.Tensor:
        """``[B, T]`` positions of the new tokens."""
        return torch.arange(self.length, self.length + num_new, device=device).expand(batch, -1)

    def hash_ids(self, hasher, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
        """Engram hash ids ``{layer: [B, T, K]}`` of the new tokens ``[B, T]``, hashed with the
        last N-1 ids before them (the sequence's left padding where there are fewer), exactly as
        hashing the whole sequence gives them. Call before the forward that runs them."""
        new = tokens.detach().cpu().numpy().astype(np.int64)
        window = new if self.tokens is None else np.concatenate([self.tokens, new], axis=1)
        look_back = hasher.max_ngram_size - 1
        self.tokens = window[:, window.shape[1] - min(look_back, window.shape[1]) :]
        count = new.shape[1]
        return {
            layer: torch.from_numpy(np.ascontiguousarray(ids[:, ids.shape[1] - count :])).to(
                tokens.device
            )
            for layer, ids in hasher.hash(window).items()
        }
