"""Process-group set-up from torchrun or slurm variables, with timeouts (a hang becomes an
error)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def env_world_size() -> int:
    """The world size torchrun or slurm announce (1 when launched as a plain process)."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def init_distributed(device: str = "auto", timeout_seconds: int = 600) -> DistInfo:
    """Initialise the default process group when launched with several processes.

    torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Under a bare ``srun``
    the SLURM_* variables are used (MASTER_ADDR / MASTER_PORT must then be exported by the sbatch
    file).
    Backend: NCCL on CUDA, gloo on CPU.
    """
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        for key, fallback in (("MASTER_ADDR", None), ("MASTER_PORT", None)):
            if key not in os.environ and fallback is None:
                raise RuntimeError(
                    f"{key} is not set: launch with torchrun, or export it in the sbatch file"
                )
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_seconds),
        )
    return DistInfo(rank, local_rank, world, dev)


_CPU_GROUPS: dict[tuple[int, ...], object] = {}


def cpu_group_for(group, *, force_new: bool = False):
    """A gloo group over ``group``'s ranks, for host-side exchanges (the group itself if gloo).

    Safe under NCCL, where every rank builds only the side groups it belongs to, in its own order:
    ``use_local_synchronization`` names a group by its ranks and synchronises only its members (a
    plain ``new_group`` would need every rank to create every group in one global order, or the
    groups' store keys collide). One gloo group per set of ranks is kept and reused.
    ``force_new``: build the side group even on a gloo world (tests of this path).
    """
    if dist.get_backend(group) in ("gloo", "fake") and not force_new:  # fake: dry runs
        return group
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks not in _CPU_GROUPS:
        _CPU_GROUPS[ranks] = dist.new_group(
            list(ranks), backend="gloo", use_local_synchronization=True
        )
    return _CPU_GROUPS[ranks]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for a store or a test's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, group=group)
    return tensor


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUPS.clear()
