"""Per-block wrappers applied after the parallel styles: activation checkpointing, then
``torch.compile``. Both work in place on a ``ModuleDict`` of blocks, so parameter names and
checkpoint keys do not change.

A recomputed block that holds an Engram layer keeps the rows its table lookup returned: the
lookup runs before the checkpointed region (``_LookupOutside``), so the recompute in backward
does not look up, exchange ids or acquire cache slots again; only the gate, value and conv are
recomputed. The rows are saved as the region's input (``[B, T, K, Dh]`` per Engram layer).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def apply_block_wrappers(
    blocks: nn.ModuleDict, activation_checkpoint: Literal["none", "full"], compile_blocks: bool
) -> None:
    """``full``: recompute each block in backward; ``compile_blocks``: compile each block."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in list(blocks.items()):
        if activation_checkpoint == "full":
            engram = getattr(block, "engram", None)
            block = checkpoint_wrapper(block, preserve_rng_state=False)
            if engram is not None:
                block.register_forward_pre_hook(_LookupOutside(engram), with_kwargs=True)
        if compile_blocks:
            block.compile()  # in place: parameter names and state-dict keys stay the same
        blocks[key] = block


class _LookupOutside:
    """Forward pre-hook of a checkpointed block: look the Engram rows up before the region and
    hand them in as ``EngramInputs.rows`` (the block's fourth argument, or ``engram=``)."""

    def __init__(self, engram: nn.Module):
        self.engram = engram

    def __call__(self, module, args, kwargs):
        from data.batch import EngramInputs

        if len(args) > 3:
            inputs = args[3]
        else:
            inputs = kwargs.get("engram")
        if torch.is_tensor(inputs):  # bare hash ids
            inputs = EngramInputs(inputs)
        if not isinstance(inputs, EngramInputs) or inputs.rows is not None:
            return None
        if kwargs.get("cache") is not None or (len(args) > 4 and args[4] is not None):
            return None  # decoding: the lookup stays in the block
        rows = self.engram.table(inputs.hash_ids, inputs.plan)
        looked_up = EngramInputs(inputs.hash_ids, inputs.plan, rows)
        if len(args) > 3:
            return (*args[:3], looked_up, *args[4:]), kwargs
        return args, {**kwargs, "engram": looked_up}
