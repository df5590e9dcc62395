"""Tensor parallelism (Megatron-style, on DTensor): column-parallel in, row-parallel out.

The model family gives a plan ``{module path: "colwise" | "rowwise" | "colwise_vocab" | ...}``; this
module turns it into DTensor ``ParallelStyle``s. ``colwise_vocab`` shards the LM head's output over
the vocabulary and keeps the logits a DTensor, for the vocab-parallel loss (``loss_parallel``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def apply_tensor_parallel(model: nn.Module, tp_mesh, plan: dict[str, str]) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        PrepareModuleOutput,
        RowwiseParallel,
        parallelize_module,
    )

    seq, rep = Shard(1), Replicate()
    styles = {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "colwise_vocab": lambda: ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        "colwise_gather": lambda: ColwiseParallel(output_layouts=rep),
        # sequence parallel: activations between blocks are sharded on the sequence dim (dim 1)
        "rowwise_to_seq": lambda: RowwiseParallel(output_layouts=seq),
        "colwise_vocab_from_seq": lambda: ColwiseParallel(
            input_layouts=seq, output_layouts=Shard(-1), use_local_output=False
        ),
        "seq_output": lambda: PrepareModuleOutput(
            output_layouts=rep, desired_output_layouts=seq, use_local_output=True
        ),
        "seq_gather_input": lambda: PrepareModuleInput(  # attention(x, rope, mask)
            input_layouts=(seq, None, None),
            desired_input_layouts=(rep, None, None),
            use_local_output=True,
        ),
        "seq_gather_input1": lambda: PrepareModuleInput(  # ffn(x)
            input_layouts=(seq,), desired_input_layouts=(rep,), use_local_output=True
        ),
        "seq_gather_input_shard_output": lambda: PrepareModuleInputOutput(  # engram(x, inputs)
            input_layouts=(seq, None),
            desired_input_layouts=(rep, None),
            use_local_input=True,
            output_layouts=rep,
            desired_output_layouts=seq,
            use_local_output=True,
        ),
    }
    group = tp_mesh.get_group()
    for path, kind in plan.items():
        if kind == "grad_allreduce":  # replicated output consumed by sharded heads
            model.get_submodule(path).register_forward_hook(
                lambda module, inputs, output: _AllReduceGrad.apply(output, group)
            )
    parallelize_module(
        model,
        tp_mesh,
        {
            path: _float8_style(model.get_submodule(path), kind) or styles[kind]()
            for path, kind in plan.items()
            if kind in styles
        },
    )


def _float8_style(module: nn.Module, kind: str):
    """torchao's float8 style for a float8 linear of the tensorwise recipe (its activations are
    cast to float8 before the style's collectives, and its weight shards take one scale); None
    for anything else, which keeps the plain style (rowwise scales are local to each row)."""
    if kind not in ("colwise", "rowwise") or type(module).__name__ != "Float8Linear":
        return None
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

    casts = (module.config.cast_config_input, module.config.cast_config_grad_output)
    if any(cast.scaling_granularity is not ScalingGranularity.TENSORWISE for cast in casts):
        return None
    return Float8ColwiseParallel() if kind == "colwise" else Float8RowwiseParallel()


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; sums the gradient over the tensor-parallel group (Megatron's ``f``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def vocab_parallel_loss(enabled: bool):
    """Context for the cross-entropy (and its backward) on vocab-sharded logits."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()
