"""The simulator's model of compiled blocks against inductor itself, on the CPU.

For each block of a small model, the fused kernels that ``pretrain.simulation.fusion`` charges
for the block's forward and backward (memory-bound kernels only: GEMMs stay extern in both) are
set beside the kernels inductor generates when the same block is compiled and run forward and
backward on the CPU (the C++ kernels defined in the code it emits). Inductor's C++ backend
groups loops differently from its Triton one, so this is a plausibility check of the model's
kernel counts, not a GPU measurement; the eager kernel count says how much the model removes.

Run: .venv/bin/python -m benchmarks.fusion_model [--flavor debug] [--seq 64]
"""

from __future__ import annotations

import argparse
import copy

import torch

from data.batch import EngramInputs
from models.flavors import get_flavor
from models.transformer import Transformer


def _batch(args, batch: int, seq: int) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=g)
    engram = {}
    if args.engram is not None:
        heads = len(args.engram.hash.engram_vocab_size) * args.engram.hash.n_head_per_ngram
        for layer in args.engram.hash.layer_ids:
            engram[layer] = EngramInputs(torch.randint(0, 50, (batch, seq, heads), generator=g))
    return tokens, engram


def modelled(model, tokens, engram) -> dict[str, dict[str, int]]:
    """Per block: eager and fused memory-bound kernels of its forward and backward."""
    from pretrain.simulation.fusion import BACKWARD_REGION, EAGER, fuse_compiled, watch_blocks
    from pretrain.simulation.simulate import StepTracer

    out = {}
    for key in model.layers:
        holder = torch.nn.Module()
        holder.layers = torch.nn.ModuleDict({key: model.layers[key]})
        tracer = StepTracer(0)
        tracer.set_phase("microbatch", 0)
        hooks = watch_blocks(holder, tracer)
        with tracer:
            model(tokens, engram=engram).logits.float().square().mean().backward()
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)

        def count(ops, backward: bool) -> int:
            return sum(
                1
                for op in ops
                if op.region != EAGER
                and op.flops == 0
                and (op.region >= BACKWARD_REGION) == backward
            )

        fused = fuse_compiled(tracer.ops)
        out[key] = {
            "eager_forward": count(tracer.ops, False),
            "eager_backward": count(tracer.ops, True),
            "fused_forward": count(fused, False),
            "fused_backward": count(fused, True),
        }
    return out


def generated(model, tokens, engram) -> dict[str, int]:
    """Per block: the kernels inductor generates for it, forward and backward, on the CPU (the
    C++ kernels defined in the code it emits; ``metrics.generated_kernel_count`` also counts
    each kernel's vectorised and scalar variants)."""
    from torch._inductor.utils import run_and_get_code

    out = {}
    for key in model.layers:
        compiled = copy.deepcopy(model)
        compiled.layers[key].compile()
        torch._dynamo.reset()

        def step(compiled=compiled):
            compiled(tokens, engram=engram).logits.float().square().mean().backward()

        _, codes = run_and_get_code(step)
        out[key] = sum(code.count("async_compile.cpp_pybinding(") for code in codes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    ns = parser.parse_args()
    torch.manual_seed(0)
    args = get_flavor(ns.flavor)
    model = Transformer(args)
    model.init_weights()
    tokens, engram = _batch(args, ns.batch, ns.seq)
    model_counts = modelled(model, tokens, engram)
    inductor = generated(model, tokens, engram)
    print(f"flavor {ns.flavor}, batch {ns.batch} x {ns.seq}, float32, CPU")
    print("| block | eager kernels (fwd + bwd) | modelled fused (fwd + bwd) | inductor generated |")
    print("|---|---|---|---|")
    for key, counts in model_counts.items():
        eager = counts["eager_forward"] + counts["eager_backward"]
        fused = counts["fused_forward"] + counts["fused_backward"]
        print(
            f"| {key} | {eager} ({counts['eager_forward']} + {counts['eager_backward']}) | "
            f"{fused} ({counts['fused_forward']} + {counts['fused_backward']}) | {inductor[key]} |"
        )


if __name__ == "__main__":
    main()
