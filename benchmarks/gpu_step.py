"""One-GPU training-step throughput and MFU of paper-width models: MoE-27B against Engram-27B,
cut to a few layers so that one GPU holds them (the paper's widths, expert counts, MLA, mHC and
Engram shapes; Engram layers moved into the first layers and tables shortened: a lookup's cost
does not depend on the table's size). bf16 autocast, the real step (``pretrain.step``) with
AdamW + row-wise Adam, random tokens and hash ids; attention through flex_attention block masks
(documents of 512 tokens) and through SDPA's dense mask.

MFU = flops_per_token (``models.accounting``) x tokens/s / peak; peak defaults to the H100 SXM's
dense bf16 989 TFLOP/s. Needs CUDA. Run: python -m benchmarks.gpu_step [--layers 3] [--seq 4096]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import print_table
from data.batch import Batch, EngramInputs
from models.accounting import account
from models.flavors import get_flavor
from models.transformer import Transformer
from parallel.plan import ParallelPlan
from pretrain.config import OptimizerConfig
from pretrain.optimizer import Optimizers
from pretrain.step import StepModel, forward_backward, optimizer_step


def _args(flavor: str, layers: int, rows: int, backend: str):
    args = get_flavor(flavor)
    args.num_layers = layers
    args.attention_backend = backend
    if args.engram is not None:
        args.engram.hash.layer_ids = [1, min(2, layers - 1)]
        args.engram.hash.engram_vocab_size = [rows, rows]
    return args


def _batch(args, batch: int, seq: int, doc_len: int, device) -> Batch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=g)
    positions = (torch.arange(seq) % doc_len).expand(batch, seq)
    doc_ids = (torch.arange(seq) // doc_len).expand(batch, seq)
    engram = {}
    if args.engram is not None:
        for layer, sizes in args.engram.table_sizes().items():
            ids = torch.stack([torch.randint(0, s, (batch, seq), generator=g) for s in sizes], -1)
            engram[layer] = EngramInputs(ids)
    return Batch(tokens[:, :-1], tokens[:, 1:], positions, doc_ids, engram).to(device)


def build_step(
    args, device, mixed_precision: str = "bf16", convert=None, compile_blocks: bool = False
) -> tuple[StepModel, Optimizers]:
    """The model of ``args`` on ``device`` (built on meta, ``convert(model)`` there: a model
    converter such as FP8; initialised on the device; each block compiled on request), its step
    model and optimizers."""
    with torch.device("meta"):
        model = Transformer(args)
    if convert is not None:
        convert(model)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    if compile_blocks:
        from parallel.wrappers import apply_block_wrappers

        apply_block_wrappers(model.layers, "none", compile_blocks=True)
    sm = StepModel(model, model, ParallelPlan(), mixed_precision=mixed_precision)
    return sm, Optimizers(model, OptimizerConfig(lr=1e-4))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(
    args, batch: Batch, device, steps: int, warmup: int, mixed_precision="bf16", **build
):
    """``(seconds per step, peak GiB on a GPU or None, the step model and optimizers)``: the
    real step of ``args`` on ``batch``, after ``warmup`` steps (``build``: ``build_step``'s
    ``convert`` and ``compile_blocks``)."""
    sm, opts = build_step(args, device, mixed_precision, **build)
    for _ in range(warmup):
        forward_backward(sm, batch)
        optimizer_step(sm, opts, 1.0)
    _sync(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        forward_backward(sm, batch)
        optimizer_step(sm, opts, 1.0)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return seconds, peak, sm, opts


def profile_step(sm, opts, batch, device) -> list[tuple[str, float]]:
    """``(kernel or op name, total microseconds)`` of one step, longest first: CUDA kernels on a
    GPU, aten ops on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        forward_backward(sm, batch)
        optimizer_step(sm, opts, 1.0)
        _sync(device)
    events = prof.key_averages()
    key = "device_time_total" if cuda else "cpu_time_total"
    rows = [(e.key, float(getattr(e, key, 0.0) or 0.0)) for e in events]
    return sorted(rows, key=lambda r: -r[1])


def measure(flavor, backend, ns) -> list:
    device = torch.device("cuda")
    args = _args(flavor, ns.layers, ns.rows, backend)
    batch = _batch(args, ns.batch, ns.seq, ns.doc_len, device)
    seconds, peak, sm, opts = time_steps(args, batch, device, ns.steps, ns.warmup)
    if ns.profile:
        print(f"== {flavor} ({backend}): top CUDA kernels of one step")
        for name, micros in profile_step(sm, opts, batch, device)[: ns.profile]:
            print(f"{micros / 1e3:10.3f} ms  {name}")
    tokens = ns.batch * ns.seq
    acc = account(args, ns.seq)
    mfu = acc.flops_per_token * tokens / seconds / (ns.peak_tflops * 1e12)
    del sm, opts, batch
    torch.cuda.empty_cache()
    return [f"{flavor} x{ns.layers} layers", backend, seconds, tokens / seconds, mfu, peak]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--doc_len", type=int, default=512)
    parser.add_argument("--rows", type=int, default=200_000, help="Engram rows per head")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    parser.add_argument("--flavors", default="moe-27b,engram-27b")
    parser.add_argument("--backends", default="flex,sdpa")
    parser.add_argument("--profile", type=int, default=0, help="print the top N CUDA kernels")
    ns = parser.parse_args()
    rows = []
    for backend in ns.backends.split(","):
        for flavor in ns.flavors.split(","):
            rows.append(measure(flavor, backend, ns))
            print(rows[-1], flush=True)
    print_table(["model", "attention", "s/step", "tokens/s", "MFU", "peak GiB"], rows)
    by = {(r[0].split()[0], r[1]): r[3] for r in rows}
    for backend in ns.backends.split(","):
        if ("moe-27b", backend) in by and ("engram-27b", backend) in by:
            ratio = by[("engram-27b", backend)] / by[("moe-27b", backend)]
            print(f"engram_vs_moe_tokens_per_s ({backend}): {ratio:.3f}")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")


if __name__ == "__main__":
    main()
