"""Forward + backward tokens/s of the debug and demo flavors on CPU, and grouped-matmul experts
against the per-expert loop fallback (same weights, same routing).

Run: .venv/bin/python -m benchmarks.model_throughput
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import print_table, time_calls
from data.batch import EngramInputs
from models.args import MoEArgs
from models.flavors import get_flavor
from models.moe import MoE
from models.transformer import build_model


def flavor_row(name: str, batch: int, seq: int) -> list:
    args = get_flavor(name)
    args.vocab_size = 16000
    model = build_model(args)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16000, (batch, seq), generator=g)
    engram = None
    if args.engram is not None:
        engram = {
            layer: EngramInputs(
                torch.randint(0, 2000, (batch, seq, args.engram.num_heads), generator=g)
            )
            for layer in args.engram.layer_ids
        }

    def step():
        out = model(tokens, engram=engram)
        F.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()).backward()

    seconds = time_calls(step, repeats=5, warmup=1)
    return [name, f"{batch}x{seq}", batch * seq / seconds]


def experts_rows() -> list[list]:
    rows = []
    torch.manual_seed(0)
    moe = MoE(256, MoEArgs(num_routed_experts=16, top_k=4, expert_hidden_dim=256))
    moe.init_weights(0.02, 0.02)
    x = torch.randn(4096, 256, requires_grad=True)
    counts = torch.bincount(torch.randint(0, 16, (4096,)), minlength=16)
    for label, fn in (("grouped_mm", moe.experts), ("loop", moe.experts.forward_loop)):

        def step(fn=fn):
            fn(x, counts).square().mean().backward()

        rows.append(
            [f"experts ({label})", "4096 tokens, 16x256x256", 4096 / time_calls(step, 7, 2)]
        )
    return rows


def main() -> None:
    rows = [flavor_row("debug", 8, 128), flavor_row("demo", 8, 256)] + experts_rows()
    print_table(["what", "shape", "tokens/s"], rows)
    print(f"grouped_vs_loop: {rows[2][2] / rows[3][2]:.2f}x  threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
