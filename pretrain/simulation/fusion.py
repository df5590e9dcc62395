"""What compiled blocks launch: inductor's fusion of the memory-bound kernels, modelled.

Under ``compile.enable`` each transformer block is compiled (forward, its recompute, backward),
and inductor fuses the element-wise and reduction kernels between two extern kernels (GEMMs,
attention, collectives, gathers and scatters) into a few generated kernels. The traced step is
eager (fake tensors cannot be compiled), so ``fuse_compiled`` rewrites its kernel list:

- the ops of one compiled region (one block's forward, or its backward with the recompute) that
  are consecutive and fusible form a run; anything else ends it: a GEMM (FLOPs), an op that
  addresses rows (``roofline.INDEXED``), an op outside the region. A float8 cast (abs, amax,
  scale, clamp, convert) is element-wise work like any other: it fuses with the kernel that
  made its input, as torchao relies on inductor to do;
- a run moves what a fused kernel must: every tensor it reads that was made before it, once,
  and every tensor it writes that is read after it (saved for backward, the next GEMM's input,
  a gradient) or that existed before it (in place); its intermediates stay in registers;
- Engram's kernels form runs of their own, so that its share stays its own (a run ends where
  Engram's layer ends, one tensor's write and read more than inductor's);
- it launches one kernel per reduction over more than ``UNROLLED`` elements it holds (at least
  one): a reduction carries its element-wise prologue and epilogue, as inductor's (persistent)
  reductions do.

This is a lower bound of the bytes (inductor may read an input twice, or split a run where
loop shapes differ) and a high count of the kernels (inductor also fuses across extern kernels
by reordering, and loads gathered rows inside its kernels: on the CPU it makes 21 and 40 where
this model charges 54 and 63 for the debug flavor's two blocks, ``benchmarks/fusion_model.py``).
It answers how much of an eager step's memory-bound time compilation can take away. Tensors are
told apart by their storage (views share it).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pretrain.simulation.roofline import INDEXED, OpRecord

EAGER = -1  # the region of a kernel outside every compiled block
BACKWARD_REGION = 1 << 40  # a block call's backward region: its forward's plus this

# kernels that stay extern under compilation
_EXTERN = INDEXED | {
    "_grouped_mm",
    "topk",
    "sort",
    "nonzero",
    "histc",
    "bincount",
    "_to_copy_sparse",
    "_coalesce",
}
# ops whose output keeps the input's shape but which reduce inside (softmax, norms)
_ROW_REDUCTIONS = {
    "_softmax",
    "_log_softmax",
    "_softmax_backward_data",
    "_log_softmax_backward_data",
    "_fused_rms_norm",
    "_fused_rms_norm_backward",
    "native_layer_norm",
    "native_layer_norm_backward",
    "cumsum",
}


def fusible(op: OpRecord) -> bool:
    return op.region != EAGER and op.flops == 0 and op.name not in _EXTERN


UNROLLED = 8  # inductor's ``unroll_reductions_threshold``: shorter reductions are element-wise


def is_reduction(op: OpRecord) -> bool:
    """An op that launches a reduction kernel: a row reduction by name, or fewer elements out
    than in by more than ``UNROLLED`` (inductor unrolls a reduction over at most 8 elements,
    mHC's Sinkhorn over its G x G matrices for one, into element-wise code)."""
    if op.name in _ROW_REDUCTIONS:
        return True
    largest_in = max((n for _, n in op.reads), default=0)
    largest_out = max((n for _, n, _ in op.writes), default=0)
    return 0 < largest_out and largest_in > UNROLLED * largest_out


def fuse_compiled(ops: list[OpRecord]) -> list[OpRecord]:
    """``ops`` with every run of fusible ops of one compiled region replaced by its kernels."""
    last_read: dict[int, int] = {}
    for index, op in enumerate(ops):
        for serial, _ in op.reads:
            last_read[serial] = index
    out: list[OpRecord] = []
    start = 0
    while start < len(ops):
        op = ops[start]
        if not fusible(op):
            out.append(op)
            start += 1
            continue
        end = start + 1
        while end < len(ops) and fusible(ops[end]) and _same_run(ops[end], op):
            end += 1
        out += _fused_run(ops[start:end], end - 1, last_read)
        start = end
    return out


def _same_run(op: OpRecord, first: OpRecord) -> bool:
    """One region, and Engram's kernels apart from the rest (its share stays attributed)."""
    return op.region == first.region and op.engram == first.engram and op.phase == first.phase


def _fused_run(run: list[OpRecord], last: int, last_read: dict[int, int]) -> list[OpRecord]:
    """The kernels of one run (``last``: the index of its last op in the step's list)."""
    if len(run) == 1:
        return run
    made: set[int] = set()
    read: dict[int, int] = {}  # tensors from before the run: bytes
    written: dict[int, int] = {}
    for op in run:
        for serial, nbytes in op.reads:
            if serial not in made:
                read[serial] = max(read.get(serial, 0), nbytes)
        for serial, nbytes, fresh in op.writes:
            written[serial] = max(written.get(serial, 0), nbytes)
            if fresh:
                made.add(serial)
    kept = sum(
        nbytes
        for serial, nbytes in written.items()
        if serial not in made or last_read.get(serial, -1) > last
    )
    nbytes = float(sum(read.values()) + kept)
    kernels = max(1, sum(is_reduction(op) for op in run))
    first = run[0]
    share = replace(
        first,
        bytes=nbytes / kernels,
        name=f"fused({len(run)})",
        reads=(),
        writes=(),
    )
    return [share] * kernels


def watch_blocks(model, tracer) -> list:
    """Hooks that tell the tracer (``simulate.StepTracer``) which kernels a compiled block runs
    (``compile.enable``): each block call is a region (its forward), and the autograd nodes it
    made are the region's backward (the recompute of a checkpointed block runs while one of
    them does)."""
    calls = iter(range(BACKWARD_REGION))
    outer: list[int] = []
    tracer.fusion = True

    def enter(module, args):
        outer.append(tracer.region)
        tracer.region = next(calls)

    def leave(module, args, output):
        backward = tracer.region + BACKWARD_REGION
        tracer.region = outer.pop()
        if torch._C._current_autograd_node() is not None:
            return  # a recompute in backward: its kernels belong to the node that runs it
        for node in nodes_between(args, output):  # a parameter's AccumulateGrad: the latest
            tracer.region_nodes[node] = backward

    hooks = []
    for block in model.layers.values():
        block = getattr(block, "_checkpoint_wrapped_module", block)  # the recompute calls it
        hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    return hooks


def nodes_between(args, output) -> list:
    """The autograd nodes from ``output`` back to (not including) those of ``args``."""
    from torch.utils._pytree import tree_leaves

    stop = {t.grad_fn for t in tree_leaves(args) if isinstance(t, torch.Tensor)}
    todo = [t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
    seen: set = set()
    while todo:
        node = todo.pop()
        if node is None or node in stop or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return list(seen)
