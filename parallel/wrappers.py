"""Per-block wrappers applied after the parallel styles: activation checkpointing, then
``torch.compile``. Both work in place on a ``ModuleDict`` of blocks, so parameter names and
checkpoint keys do not change."""

from __future__ import annotations

from typing import Literal

from torch import nn


def apply_block_wrappers(
    blocks: nn.ModuleDict, activation_checkpoint: Literal["none", "full"], compile_blocks: bool
) -> None:
    """``full``: recompute each block in backward; ``compile_blocks``: compile each block."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in list(blocks.items()):
        if activation_checkpoint == "full":
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile_blocks:
            block.compile()  # in place: parameter names and state-dict keys stay the same
        blocks[key] = block
