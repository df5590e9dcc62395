"""Step time of a traced step (``pretrain.simulation.simulate``) on stated hardware: the
``est_*`` fields.

Constants are public specs, one set for every recipe (flags override them):
- compute: H100 SXM dense bf16 989 TFLOP/s at one attained ``efficiency`` (0.40) for all work;
- NVLink 450 GB/s per direction per GPU inside a node of ``gpus_per_node`` (8);
- InfiniBand 400 Gb/s = 50 GB/s per GPU between nodes;
- ``latency_us`` (20) per collective; CPU side groups (host integers) cost that alone.

Link of a collective: a group inside one node uses NVLink; a group spanning nodes is bound by
InfiniBand for ring collectives (all-gather, reduce-scatter, all-reduce: the ring crosses a node
boundary at every step), while an all-to-all sends its off-node share over InfiniBand and its
on-node share over NVLink at the same time.

Overlap, from what the code does:
- FSDP2's all-gathers and reduce-scatters (and HSDP's all-reduce) run on their own CUDA streams
  and are prefetched a block ahead, so within a microbatch they hide behind its compute; the
  first all-gather of a microbatch (nothing to hide behind) and any excess over the compute are
  exposed.
- Everything else blocks the compute stream: expert-parallel and Engram-table all-to-alls (their
  results are needed at once), and all optimizer-phase collectives (expert and table gradient
  reductions, the global norm).

Compute FLOPs: the model's training FLOPs per token (``models.accounting``: 6 x activated
parameters plus causal attention) times the tokens, times 4/3 with full activation
checkpointing (the forward runs again in backward). MFU counts the model FLOPs only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pretrain.simulation.simulate import Collective

GB = 1e9


@dataclass
class Hardware:
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    efficiency: float = 0.40  # attained fraction of peak, the same for every recipe
    nvlink_gbps: float = 450.0  # GB/s per direction per GPU
    ib_gbps: float = 50.0  # 400 Gb/s per GPU
    gpus_per_node: int = 8
    latency_us: float = 20.0

    def as_dict(self) -> dict:
        return asdict(self)


# FSDP's gathers and scatters, HSDP's all-reduce and the expert-gradient all-reduce started in
# the last backward: issued on their own streams during a microbatch
OVERLAPPED = {"all_gather", "reduce_scatter", "all_reduce"}


def collective_seconds(c: Collective, hw: Hardware) -> float:
    """Seconds one collective takes on ``hw`` (see the module doc)."""
    latency = hw.latency_us * 1e-6
    if c.host or c.sent_bytes == 0:
        return latency
    nodes = {r // hw.gpus_per_node for r in c.ranks}
    if len(nodes) == 1:
        return latency + c.sent_bytes / (hw.nvlink_gbps * GB)
    if c.kind != "all_to_all":
        return latency + c.sent_bytes / (hw.ib_gbps * GB)
    me = c.ranks[0] // hw.gpus_per_node  # peers are spread the same way from every member
    on_node = sum(1 for r in c.ranks if r // hw.gpus_per_node == me) - 1
    off_node = len(c.ranks) - 1 - on_node
    share = c.sent_bytes / max(len(c.ranks) - 1, 1)
    return latency + max(
        share * off_node / (hw.ib_gbps * GB), share * on_node / (hw.nvlink_gbps * GB)
    )


def _overlapped(c: Collective) -> bool:
    return c.phase == "microbatch" and not c.host and c.kind in OVERLAPPED


def estimate(
    collectives: list[Collective],
    *,
    microbatches: int,
    tokens_per_microbatch: int,
    data_parallel_degree: int,
    world_size: int,
    flops_per_token: float,
    recompute: bool,
    hw: Hardware,
) -> dict:
    """The ``est_*`` fields of one rank's step (``data_parallel_degree`` ranks see different
    tokens; MFU divides by all ``world_size`` GPUs)."""
    hardware_flops = flops_per_token * (4 / 3 if recompute else 1.0)
    compute_mb = tokens_per_microbatch * hardware_flops / (hw.peak_tflops * 1e12 * hw.efficiency)
    by_micro: dict[int, list[Collective]] = {}
    for c in collectives:
        by_micro.setdefault(c.microbatch, []).append(c)
    comm = exposed = 0.0
    for index, group in by_micro.items():
        repeat = group[0].repeat
        times = [(collective_seconds(c, hw), _overlapped(c)) for c in group]
        total = sum(t for t, _ in times)
        comm += repeat * total
        if index == -1:  # the optimizer phase: nothing to hide behind
            exposed += total
            continue
        blocking = sum(t for t, hidden in times if not hidden)
        hidden = [t for t, h in times if h]
        first = hidden[0] if hidden else 0.0
        excess = max(0.0, sum(hidden) - first - compute_mb)
        exposed += repeat * (blocking + first + excess)
    compute = microbatches * compute_mb
    step = compute + exposed
    tokens = microbatches * tokens_per_microbatch * data_parallel_degree
    return {
        "est_compute_s": round(compute, 3),
        "est_comm_s": round(comm, 3),
        "est_exposed_comm_s": round(exposed, 3),
        "est_step_s": round(step, 3),
        "est_tokens_per_s": round(tokens / step),
        "est_mfu": round(tokens / step * flops_per_token / (world_size * hw.peak_tflops * 1e12), 4),
    }
