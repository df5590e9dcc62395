"""Collectives of a traced step: what each rank sends, over which group, and whether it runs
beside compute (``pretrain.simulation.simulate`` records them; ``cost_model`` prices them)."""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.dims import ParallelDims

GIB = 2**30
c10d = torch.ops.c10d
_functional = torch.ops._c10d_functional


@dataclass
class Collective:
    """One collective as one rank sees it."""

    kind: str  # all_gather, reduce_scatter, all_reduce, all_to_all, broadcast
    ranks: tuple[int, ...]  # the process group's members
    payload_bytes: int  # the full buffer: gathered output, scattered input, reduced tensor, sent
    sent_bytes: int  # what this rank puts on the wire (ring algorithms; off-rank all-to-all)
    phase: str  # "microbatch" or "optimizer"
    microbatch: int  # index of the microbatch (-1 in the optimizer phase)
    host: bool  # a CPU (gloo) side group: host integers, no GPU link
    repeat: int = 1  # how many microbatches of the step issue it (``trace_step`` traces two)
    overlapped: bool = False  # issued where the code runs it beside compute (``_overlapping``)


def _ring_sent(kind: str, nbytes: int, n: int) -> int:
    if n <= 1:
        return 0
    if kind == "all_reduce":
        return 2 * nbytes * (n - 1) // n
    return nbytes * (n - 1) // n  # all_gather of the output, reduce_scatter of the input


def _process_group(group) -> dist.ProcessGroup:
    """A collective's group argument: a name (functional collectives) or a boxed c10d object."""
    if isinstance(group, str):
        from torch._C._distributed_c10d import _resolve_process_group

        return _resolve_process_group(group)
    return group if isinstance(group, dist.ProcessGroup) else dist.ProcessGroup.unbox(group)


def _nbytes(tensors) -> int:
    if isinstance(tensors, (list, tuple)):
        return sum(_nbytes(t) for t in tensors)
    return tensors.numel() * tensors.element_size()


# op -> (kind, index of the process group argument, how to read the payload from the arguments)
COLLECTIVES = {
    c10d.allreduce_.default: ("all_reduce", 1, lambda a: _nbytes(a[0])),
    c10d._allgather_base_.default: ("all_gather", 2, lambda a: _nbytes(a[0])),
    c10d.allgather_into_tensor_coalesced_.default: ("all_gather", 2, lambda a: _nbytes(a[0])),
    c10d._reduce_scatter_base_.default: ("reduce_scatter", 2, lambda a: _nbytes(a[1])),
    c10d.reduce_scatter_tensor_coalesced_.default: ("reduce_scatter", 2, lambda a: _nbytes(a[1])),
    c10d.alltoall_base_.default: ("all_to_all", 2, lambda a: _nbytes(a[1])),
    c10d.broadcast_.default: ("broadcast", 1, lambda a: _nbytes(a[0])),
    _functional.all_reduce.default: ("all_reduce", 2, lambda a: _nbytes(a[0])),
    _functional.all_gather_into_tensor.default: (
        "all_gather",
        2,
        lambda a: _nbytes(a[0]) * a[1],
    ),
    _functional.reduce_scatter_tensor.default: ("reduce_scatter", 3, lambda a: _nbytes(a[0])),
    _functional.all_to_all_single.default: ("all_to_all", 3, lambda a: _nbytes(a[0])),
}


class CommRecorder:
    """Records the collectives this rank issues (c10d and functional collectives)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.records: list[Collective] = []
        self.phase, self.microbatch, self.repeat = "microbatch", 0, 1

    def record(self, func, args) -> None:
        kind, group_index, payload = COLLECTIVES[func]
        group = _process_group(args[group_index])
        ranks = tuple(dist.get_process_group_ranks(group))
        nbytes = payload(args)
        if kind == "all_to_all":
            sent = self._all_to_all_sent(func, args, ranks, nbytes)
        else:
            sent = _ring_sent(kind, nbytes, len(ranks))
        optimizer = self.phase == "optimizer"
        self.records.append(
            Collective(
                kind,
                ranks,
                nbytes,
                sent,
                self.phase,
                -1 if optimizer else self.microbatch,
                dist.get_backend(group) == "gloo",
                1 if optimizer else self.repeat,
                not optimizer and _overlapping(),
            )
        )

    def _all_to_all_sent(self, func, args, ranks, nbytes: int) -> int:
        """Bytes sent to the other ranks (the local split stays put)."""
        inp = args[1] if func is c10d.alltoall_base_.default else args[0]
        splits = args[4] if func is c10d.alltoall_base_.default else args[2]
        me = ranks.index(self.rank) if self.rank in ranks else 0
        rows = inp.shape[0] if inp.dim() else 1
        row_bytes = nbytes // max(rows, 1)
        if splits:
            return (sum(splits) - splits[me]) * row_bytes
        return nbytes * (len(ranks) - 1) // len(ranks)


def _overlapping() -> bool:
    """Whether the collective being issued runs beside compute: FSDP2's all-gathers and
    reduce-scatters (their own streams, prefetched a block ahead) and the asynchronous gradient
    all-reduces started as gradients become ready (``parallel/plan.py``). Every other collective
    (context parallelism's gathers, expert and table all-to-alls) blocks."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if (
            "/distributed/fsdp/" in code.co_filename
            or code.co_name == "hook"
            and (code.co_filename.endswith("parallel/plan.py"))
        ):
            return True
        frame = frame.f_back
    return False


def mesh_axis_names(dims: ParallelDims, mesh, world_size: int) -> dict[tuple[int, ...], str]:
    """This rank's group members on every mesh axis -> the axis name (the first name wins when
    two axes hold the same ranks)."""
    names: dict[tuple[int, ...], str] = {}
    meshes = [mesh] if mesh is not None else []
    if dims.ep > 1:
        meshes.append(dims.build_ep_mesh("cpu"))
    for m in meshes:
        for axis in m.mesh_dim_names:
            if m[axis].size() > 1:
                ranks = tuple(dist.get_process_group_ranks(m[axis].get_group()))
                names.setdefault(ranks, axis)
    if mesh is not None and dims.dp_group(mesh) is not None:
        names.setdefault(tuple(dist.get_process_group_ranks(dims.dp_group(mesh))), "dp")
    names.setdefault(tuple(range(world_size)), "world")
    return names


def comm_bytes(collectives: list[Collective], axis_names: dict[tuple[int, ...], str]) -> dict:
    """Bytes sent per step by this rank, keyed ``"<kind>/<axis>"`` (host side groups marked)."""
    out: dict[str, int] = defaultdict(int)
    for c in collectives:
        axis = axis_names.get(c.ranks, f"group{len(c.ranks)}")
        out[f"{c.kind}/{axis}{' (host)' if c.host else ''}"] += c.repeat * c.sent_bytes
    return dict(sorted(out.items()))


def comm_summary(collectives: list[Collective], axis_names: dict[tuple[int, ...], str]) -> dict:
    """``comm_bytes`` in GiB."""
    return {k: round(v / GIB, 3) for k, v in comm_bytes(collectives, axis_names).items()}
