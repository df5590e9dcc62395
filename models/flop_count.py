"""FLOPs and parameters counted from an instantiated model, independently of ``models.accounting``.

``measure(args, seq_len)`` builds the model on fake tensors (shapes, no values: any size runs on
a laptop), runs one forward and backward of ``2 x seq_len`` tokens under bf16 autocast, and counts
the FLOPs PyTorch's ``FlopCounterMode`` sees, plus the grouped expert GEMM, whose formula this
module registers (PyTorch has none): every routed token meets one expert, ``2 M K N``.

What the counter sees and the accounting does not, or the reverse (docs/experiments.md):
- attention runs as CPU SDPA's math path here: the full ``T x T`` scores, where the accounting
  counts the causal half;
- the counter sees only matmuls: the Engram gather, norms, gates and the router's softmax are
  not FLOPs to it (nor to the accounting, which counts matmul parameters).

Legend: M routed token copies, K model width, N expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``[M, K] x [E, K, N]`` (forward, input gradient), ``[K, M] x [M, N]`` split into groups
    (weight gradient), or ``[E, M, K] x [K, N]``: every row meets one group, 2 M K N."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:
        return 2 * b_shape[0] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[-1] * b_shape[-1]


if torch.ops.aten._grouped_mm not in flop_registry:
    register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)


@dataclass
class Measured:
    """One model's counts."""

    flops_per_token: float  # training (forward + backward), per token
    total_params: int  # every parameter of the module
    table_params: int  # Engram table rows x width
    by_op: dict  # FLOPs per token by aten op


def measure(args, seq_len: int, batch: int = 2) -> Measured:
    """Count one training step's FLOPs (per token) and the module's parameters (see module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    total = sum(p.numel() for p in model.parameters())
    tables = sum(p.numel() for n, p in model.named_parameters() if n.endswith("table.weight"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        tokens = torch.randint(0, args.vocab_size, (batch, seq_len))
        engram = {}
        if args.engram is not None:
            for layer in args.engram.layer_ids:
                heads = args.engram.num_heads
                engram[layer] = torch.zeros(batch, seq_len, heads, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(tokens, engram=engram).logits
            logits.float().sum().backward()
    tokens_counted = batch * seq_len
    by_op = {
        str(op): count / tokens_counted for op, count in counter.get_flop_counts()["Global"].items()
    }
    return Measured(counter.get_total_flops() / tokens_counted, total, tables, by_op)
