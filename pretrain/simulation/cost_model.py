"""Step time of a traced step (``pretrain.simulation.simulate``) on stated hardware: the
``est_*`` fields.

Compute is the sum of every traced kernel's roofline time (``roofline``: max of its FLOPs at the
attained compute rate and its bytes at the attained HBM rate, plus a launch), with the
efficiencies fitted to measured steps (``benchmarks/calibration.json``). So memory-bound work
(norms, gates, gathers, the optimizer) costs what it moves, and the optimizer phase is charged
too. ``est_engram_s`` is the part of it that Engram's own kernels take (its modules' forward and
backward, its tables' row-wise optimizer, the modelled sparse-gradient traffic).

Links (public specs; flags override them): NVLink 450 GB/s per direction per GPU inside a node
of ``gpus_per_node`` (8); InfiniBand 400 Gb/s = 50 GB/s per GPU between nodes; collectives attain
``bus_efficiency`` of a link (calibration file); ``latency_us`` (20) per collective; CPU side
groups (host integers) cost that alone. A group inside one node uses NVLink; a group spanning
nodes is bound by InfiniBand for ring collectives, while an all-to-all sends its off-node share
over InfiniBand and its on-node share over NVLink at the same time.

Overlap, from where the code issues a collective (``Collective.overlapped``):
- FSDP2's all-gathers and reduce-scatters (their own CUDA streams, prefetched a block ahead) and
  the asynchronous gradient all-reduces hide behind the microbatch's compute; the first one of a
  microbatch (nothing to hide behind) and any excess over the compute are exposed.
- Everything else blocks the compute stream: context parallelism's gathers, expert-parallel and
  Engram-table all-to-alls, and all optimizer-phase collectives.

Routed-expert GEMMs are multiplied by ``moe_imbalance`` (the slowest rank's share). MFU counts
the model FLOPs (``models.accounting``) only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pretrain.simulation.comm import Collective
from pretrain.simulation.roofline import Calibration, OpRecord, op_seconds
from pretrain.simulation.simulate import Trace

GB = 1e9


@dataclass
class Hardware:
    """Links; the compute and memory constants are the calibration's (``roofline.Calibration``)."""

    nvlink_gbps: float = 450.0  # GB/s per direction per GPU
    ib_gbps: float = 50.0  # 400 Gb/s per GPU
    gpus_per_node: int = 8
    latency_us: float = 20.0
    bus_efficiency: float = 1.0  # set from the calibration by ``estimate``

    def as_dict(self) -> dict:
        return asdict(self)


def collective_seconds(c: Collective, hw: Hardware) -> float:
    """Seconds one collective takes on ``hw`` (see the module doc)."""
    latency = hw.latency_us * 1e-6
    if c.host or c.sent_bytes == 0:
        return latency
    nvlink, ib = hw.nvlink_gbps * GB * hw.bus_efficiency, hw.ib_gbps * GB * hw.bus_efficiency
    nodes = {r // hw.gpus_per_node for r in c.ranks}
    if len(nodes) == 1:
        return latency + c.sent_bytes / nvlink
    if c.kind != "all_to_all":
        return latency + c.sent_bytes / ib
    me = c.ranks[0] // hw.gpus_per_node  # peers are spread the same way from every member
    on_node = sum(1 for r in c.ranks if r // hw.gpus_per_node == me) - 1
    off_node = len(c.ranks) - 1 - on_node
    share = c.sent_bytes / max(len(c.ranks) - 1, 1)
    return latency + max(share * off_node / ib, share * on_node / nvlink)


def table_optimizer_record(sparse_grad_bytes: int, microbatches: int) -> OpRecord:
    """What fake tensors cannot show (their sparse gradients have no rows): the tables' sparse
    gradients coalesced (read, sorted, written) and the row-wise Adam over as many rows (row,
    both moments and the gradient read; row and moments written)."""
    grads = sparse_grad_bytes * microbatches
    return OpRecord(0.0, 3.0 * grads + 7.0 * sparse_grad_bytes, -1, True, False, "rows")


def estimate(
    collectives: list[Collective],
    ops: list[OpRecord],
    *,
    repeats: dict[int, int],
    tokens_per_microbatch: int,
    data_parallel_degree: int,
    world_size: int,
    flops_per_token: float,
    hw: Hardware,
    cal: Calibration,
    sparse_grad_bytes: int = 0,
) -> dict:
    """The ``est_*`` fields of one rank's step. ``repeats``: traced microbatch -> how many of the
    step it stands for; ``sparse_grad_bytes``: one microbatch's table gradients (modelled)."""
    hw = Hardware(**{**hw.as_dict(), "bus_efficiency": cal.bus_efficiency})
    microbatches = sum(repeats.values())
    if sparse_grad_bytes:
        ops = [*ops, table_optimizer_record(sparse_grad_bytes, microbatches)]
    compute_by = {index: 0.0 for index in [*repeats, -1]}
    engram = 0.0
    for op in ops:
        seconds = op_seconds(op, cal)
        compute_by[op.phase] = compute_by.get(op.phase, 0.0) + seconds
        if op.engram:
            engram += seconds * repeats.get(op.phase, 1)
    by_micro: dict[int, list[Collective]] = {}
    for c in collectives:
        by_micro.setdefault(c.microbatch, []).append(c)
    comm = exposed = 0.0
    for index, group in by_micro.items():
        repeat = group[0].repeat
        times = [(collective_seconds(c, hw), c.overlapped and not c.host) for c in group]
        total = sum(t for t, _ in times)
        comm += repeat * total
        if index == -1:  # the optimizer phase: nothing to hide behind
            exposed += total
            continue
        blocking = sum(t for t, hidden in times if not hidden)
        hidden = [t for t, h in times if h]
        first = hidden[0] if hidden else 0.0
        excess = max(0.0, sum(hidden) - first - compute_by.get(index, 0.0))
        exposed += repeat * (blocking + first + excess)
    compute = sum(compute_by.get(i, 0.0) * r for i, r in repeats.items()) + compute_by[-1]
    step = compute + exposed
    tokens = microbatches * tokens_per_microbatch * data_parallel_degree
    peak = world_size * cal.peak_tflops * 1e12
    return {
        "est_compute_s": round(compute, 4),
        "est_optimizer_s": round(compute_by[-1], 4),
        "est_engram_s": round(engram, 4),
        "est_comm_s": round(comm, 4),
        "est_exposed_comm_s": round(exposed, 4),
        "est_step_s": round(step, 4),
        "est_tokens_per_s": round(tokens / step),
        "est_mfu": round(tokens / step * flops_per_token / peak, 4),
        "est_kernels": len(ops),
        "calibration": cal.summary(),
    }


def estimate_trace(
    trace: Trace, dims, world_size: int, flops_per_token: float, hw: Hardware, cal: Calibration
) -> dict:
    """``estimate`` of a traced step (``simulate.trace_step``) of a rank of ``dims``."""
    return estimate(
        trace.collectives,
        trace.ops,
        repeats=trace.repeats,
        tokens_per_microbatch=trace.tokens_per_microbatch,
        data_parallel_degree=dims.batch_degree,  # ranks holding different tokens
        world_size=world_size,
        flops_per_token=flops_per_token,
        hw=hw,
        cal=cal,
        sparse_grad_bytes=trace.sparse_grad_bytes_per_microbatch,
    )
