"""The model's sequence seam: what attention, the Engram ShortConv and the MoE balance loss call
to reach the parts of a sequence held elsewhere. ``LocalSequence`` is the whole sequence on this
rank; context parallelism (``parallel.context_parallel``) swaps in its own (../STYLE rule 1).

Legend: B batch, T sequence, W halo width, C channels.
"""

from __future__ import annotations

import torch


class LocalSequence:
    """The whole sequence on this rank: the model's default sequence seam.

    Context parallelism (``parallel.context_parallel.ContextParallelSequence``) swaps in an object
    with the same methods, whose ``gather`` and ``halo`` reach the other ranks' chunks; the model
    calls them without knowing which it has.
    """

    degree = 1
    num_chunks = 1  # contiguous chunks of the sequence held locally

    def query_index(self, local_len: int, device) -> torch.Tensor:
        return torch.arange(local_len, device=device)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x

    def gather_ids(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x

    def halo(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """``x [B, T, C]`` -> ``[B, 1, W, C]`` zeros: nothing precedes the sequence."""
        return x.new_zeros(x.shape[0], 1, width, x.shape[2])

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x


LOCAL_SEQUENCE = LocalSequence()
