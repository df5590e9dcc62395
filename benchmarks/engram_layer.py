"""What one Engram layer costs beside one MoE layer, as CPU proxies of the GPU cost: the aten ops
one forward + backward dispatches (each is at least one kernel launch and one trip through
memory on a GPU) and the CPU time.

The demo flavor's widths, batch 4 x 256, torch at 1 thread. The Engram layer runs its table
lookup (planned as the loader plans it, so its gradient goes into the step's row buffer), gate,
value and ShortConv on ``hidden [B, T, G, D]``; the MoE layer is the demo's routed +
shared experts on ``[B, T, D]``. Both backward from a sum of their outputs.

``--composite`` runs the Engram layer's composite path (autograd of every op) instead of its
fused dense tail (``models.engram_fused``), for the before/after comparison. ``--compile`` also
times the layer with its dense tail under ``torch.compile`` (inductor's CPU backend needs a C++
compiler; the sparse table lookup stays eager, inductor cannot take sparse gradients) against the
MoE layer under ``torch.compile`` (the fair comparison: both compiled), with each one's compile
warm-up (its first call).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.engram_layer [--repeats 20] [--compile]
Prints ``aten_ops_engram: N``, ``aten_ops_moe: M`` and ``cpu_time_engram_vs_moe: R`` last.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import print_table, time_calls
from models.flavors import resolve_model_args
from models.transformer import Transformer

BATCH, SEQ = 4, 256


class OpCounter(TorchDispatchMode):
    """Every aten op dispatched (views and copies included), by name."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def layers(flavor: str = "demo", overrides: dict | None = None, compiled: bool = False):
    """(Engram layer, its fwd+bwd closure, MoE layer, its closure) of ``flavor``; ``compiled``:
    the Engram closure runs its dense tail (``combine``) under ``torch.compile``, and the MoE
    closure the whole layer."""
    torch.manual_seed(0)
    args = resolve_model_args(flavor, overrides or {}, vocab_size=16000)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    engram, moe = model.engram_layers()[0], model.moe_layers()[0]
    engram.train(), moe.train()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(BATCH, SEQ, args.hc_mult, args.dim, generator=gen, requires_grad=True)
    sizes = torch.tensor(engram.table.table_sizes)
    ids = (torch.rand(BATCH, SEQ, sizes.numel(), generator=gen) * sizes).long()
    flat = torch.randn(BATCH, SEQ, args.dim, generator=gen, requires_grad=True)

    combine = torch.compile(engram.combine) if compiled else engram.combine
    moe_call = torch.compile(moe) if compiled else moe
    planner = engram.table.planner()  # what the loader's workers run: not timed here
    plan = planner(ids.numpy()).to_torch() if planner is not None else None

    def run_engram():
        engram.zero_grad(set_to_none=True)
        combine(hidden, engram.table(ids, plan).flatten(-2)).sum().backward()

    def run_moe():
        moe.zero_grad(set_to_none=True)
        moe_call(flat)[0].sum().backward()

    return engram, run_engram, moe, run_moe


def count_ops(fn) -> Counter:
    fn()  # warm: lazy initialisation is not the steady state
    with OpCounter() as counter:
        fn()
    return counter.ops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--flavor", default="demo")
    parser.add_argument("--top", type=int, default=12, help="most frequent Engram ops to list")
    parser.add_argument("--composite", action="store_true", help="Engram without the fused tail")
    parser.add_argument("--compile", action="store_true", help="also time the compiled tail")
    ns = parser.parse_args()
    torch.set_num_threads(1)
    engram, run_engram, _, run_moe = layers(ns.flavor)
    engram.fused = not ns.composite
    engram_ops, moe_ops = count_ops(run_engram), count_ops(run_moe)
    runs = {"engram": run_engram, "moe": run_moe}
    warmup = {}
    if ns.compile:
        compiled, run_compiled, _, run_compiled_moe = layers(ns.flavor, compiled=True)
        compiled.fused = not ns.composite
        for name, run in (("compiled", run_compiled), ("compiled_moe", run_compiled_moe)):
            start = time.perf_counter()
            run()  # compiles
            warmup[name] = time.perf_counter() - start
            runs[name] = run
    # side by side, alternating, so that machine noise hits every arm alike
    seconds = {name: [] for name in runs}
    for _ in range(3):
        for name, run in runs.items():
            seconds[name].append(time_calls(run, ns.repeats))
    best = {name: min(s) for name, s in seconds.items()}
    engram_t, moe_t = best["engram"], best["moe"]
    tail = "composite" if ns.composite else "fused tail"
    table = [
        [f"Engram, {tail} ({ns.flavor}, {BATCH}x{SEQ})", sum(engram_ops.values()), engram_t * 1e3],
        [f"MoE ({ns.flavor}, {BATCH}x{SEQ})", sum(moe_ops.values()), moe_t * 1e3],
    ]
    if ns.compile:
        table.append([f"Engram, {tail} compiled", "", best["compiled"] * 1e3])
        table.append(["MoE compiled", "", best["compiled_moe"] * 1e3])
    print_table(["layer (fwd+bwd, 1 thread)", "aten ops", "ms"], table)
    if ns.compile:
        print(
            f"compile warm-up (first call): Engram {warmup['compiled']:.1f} s, "
            f"MoE {warmup['compiled_moe']:.1f} s"
        )
    print("most frequent Engram ops:", dict(engram_ops.most_common(ns.top)))
    print(f"aten_ops_engram: {sum(engram_ops.values())}")
    print(f"aten_ops_moe: {sum(moe_ops.values())}")
    print(f"cpu_time_engram_vs_moe: {engram_t / moe_t:.3f}")
    if ns.compile:
        print(f"cpu_time_compiled_engram_vs_moe: {best['compiled'] / moe_t:.3f}")
        compiled_ratio = best["compiled"] / best["compiled_moe"]
        print(f"cpu_time_compiled_engram_vs_compiled_moe: {compiled_ratio:.3f}")


if __name__ == "__main__":
    main()
