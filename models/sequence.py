"""The model's sequence seam: what attention, the Engram ShortConv and the MoE balance loss call
to reach the parts of a sequence held elsewhere. ``LocalSequence`` is the whole sequence on this
rank; context parallelism (``parallel.context_parallel``) swaps in its own, so the model
knows nothing of parallelism.
"""

from __future__ import annotations

import torch


class LocalSequence:
    """The whole sequence on this rank: the model's default sequence seam.

    The model reads ``degree``, calls ``query_index`` (positions when none are given) and ``sum``
    (the MoE balance statistics) on every path. Context parallelism
    (``parallel.context_parallel.ContextParallelSequence``) swaps in an object that also has
    ``gather``, ``gather_ids`` and ``halo``, which the model calls only when ``degree > 1``
    (attention's keys and values, the mask's document ids, the ShortConv's left context).
    """

    degree = 1

    def query_index(self, local_len: int, device) -> torch.Tensor:
        return torch.arange(local_len, device=device)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x


LOCAL_SEQUENCE = LocalSequence()
