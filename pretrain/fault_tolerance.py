"""Fault tolerance in the trainer: torchft replica groups that drop out and rejoin.

``FaultTolerance`` joins the lighthouse's quorum at the start of every step. A group that is
behind (restarted, or new) receives the whole training state of a healthy peer there, rank by
rank through torchft's checkpoint transport, and trains the same step as the others. The state
(``live_state``) is this rank's local share, exactly as it sits in memory, since the peer's rank
holds the same shard of the same layout: parameters and buffers, the AdamW and row-wise states,
offloaded tables' records (host or disk), the step (which fixes the LR schedule) and the data
loader's global schedule. After each step ``committed.jsonl`` in the replica folder records the
step, the global batches it consumed and which groups' shares of them were trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from parallel.data_parallel import local_grad as _local  # a DTensor's local shard
from pretrain.optimizer import Optimizers

log = logging.getLogger(__name__)


class ReplicasLost(RuntimeError):
    """Too many steps in a row did not commit (``fault_tolerance.max_failed_steps``)."""


def _tiers(model: nn.Module) -> dict[str, object]:
    """Offloaded tables (``TierRows``) by module name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "store")}


def live_state(
    model: nn.Module, optimizers: Optimizers, flush: bool = True
) -> dict[str, torch.Tensor]:
    """This rank's model and optimizer state as local tensors. Parameters and optimizer states
    are served as they are (nothing changes them before the step commits); buffers and step
    counters, which the forward and the update change, are copied. Offloaded tables are written
    back first, then served from their store."""
    state: dict[str, torch.Tensor] = {}
    names = {}
    for name, param in model.named_parameters():
        names[id(param)] = name
        if getattr(param, "engram_tier", None) is None:
            state[f"param/{name}"] = _local(param.detach())
    for name, buffer in model.named_buffers():
        state[f"buffer/{name}"] = _local(buffer).clone()
    for i, opt in enumerate(optimizers.optimizers):
        for param, entry in opt.state.items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    value = _local(value)
                    state[f"optim{i}/{names[id(param)]}/{key}"] = (
                        value.clone() if value.dim() == 0 else value
                    )
    for name, tier in _tiers(model).items():
        if flush:
            tier.cache.flush()
        state[f"tier/{name}"] = tier.store.records
    return state


@torch.no_grad()
def load_live_state(model: nn.Module, optimizers: Optimizers, state: dict) -> None:
    """Copy a peer's ``live_state`` into this rank's tensors (the same layout)."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if getattr(param, "engram_tier", None) is None:
            _copy(_local(param.detach()), _take(state, f"param/{name}"), name)
    for name, buffer in model.named_buffers():
        _copy(_local(buffer), _take(state, f"buffer/{name}"), name)
    for i, opt in enumerate(optimizers.optimizers):
        prefix = f"optim{i}/"
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            name, field = key[len(prefix) :].rsplit("/", 1)
            param = params[name]
            entry = opt.state[param]
            if field in entry and torch.is_tensor(entry[field]):
                _copy(_local(entry[field]), value, key)
            else:  # AdamW makes its state at the first step: a fresh group has none yet
                entry[field] = _like_param(param, value, opt)
    for name, tier in _tiers(model).items():
        tier.load_records(_take(state, f"tier/{name}"), name)


def _take(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise RuntimeError(
            f"the peer's state lacks {key}: the replica groups must run the same configuration"
        )
    return state[key]


def _copy(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise RuntimeError(
            f"{name}: the peer holds shape {tuple(value.shape)}, this rank "
            f"{tuple(target.shape)}; the replica groups must run the same layout"
        )
    if not _same_memory(target, value):  # received in place: already there
        target.copy_(value)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def _like_param(param: nn.Parameter, value: torch.Tensor, opt) -> torch.Tensor:
    """An optimizer state entry for ``param`` from a peer's local tensor: a scalar step counter
    stays where AdamW keeps it (the host, or the device for the fused or capturable kernels); a
    moment takes the parameter's device and, for a DTensor, its mesh and placements."""
    if value.dim() == 0:
        on_device = opt.defaults.get("fused") or opt.defaults.get("capturable")
        return value.to(_local(param).device) if on_device else value.clone()
    value = value.to(_local(param).device)
    if hasattr(param, "placements"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
        )
    return value


@dataclass
class TrainingHandles:
    """What fault tolerance reads and restores of a training job, each by name: the model and
    its optimizers (live tensors), the loader's state functions, and the step counter.

    Attributes:
        model: the parallelised model (this rank's shards, offloaded tables included).
        optimizers: its ``Optimizers``.
        loader_state / load_loader_state: the data loader's ``state_dict`` / ``load_state_dict``.
        batches_consumed: the global batches the loader has handed out so far.
        get_step / set_step: the job's optimizer step counter (it fixes the LR schedule).
    """

    model: nn.Module
    optimizers: Optimizers
    loader_state: Callable[[], dict]
    load_loader_state: Callable[[dict], None]
    batches_consumed: Callable[[], int]
    get_step: Callable[[], int]
    set_step: Callable[[int], None]


class FaultTolerance:
    """One rank's replica group: quorum and recovery at each step, the record of trained
    batches, and the ``ft/*`` metrics.

    Args:
        cfg: the ``[fault_tolerance]`` section.
        handles: the job state it reads and restores (``TrainingHandles``).
        rank, world_size, device: this rank within its replica group, and its device.
        log_folder: the group's folder (``committed.jsonl``, state digests).
        resumed: the manager's state from a durable checkpoint (``train_state()``), if any.
        connect: makes the link to the other groups (``parallel.replicas.connect``).
    """

    def __init__(
        self,
        cfg,
        handles: TrainingHandles,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        log_folder: Path,
        resumed: dict | None = None,
        connect: Callable | None = None,
    ):
        from parallel.distributed import cpu_group_for

        if connect is None:
            from parallel.replicas import connect

        self.cfg, self.handles = cfg, handles
        self.rank, self.log_folder = rank, Path(log_folder)
        self.recoveries, self.recovery_s, self._healed = 0, 0.0, False
        self.failed_in_a_row = 0
        group = cpu_group_for(dist.group.WORLD) if dist.is_initialized() else None

        def agree(ok: bool) -> bool:
            if group is None:
                return ok
            flag = torch.tensor([0 if ok else 1])
            dist.all_reduce(flag, group=group)
            return int(flag) == 0

        self.sync = connect(
            cfg,
            rank,
            world_size,
            device,
            self.state_dict,
            self.load_state_dict,
            agree,
            self.recv_targets,
            host_tables=bool(_tiers(handles.model)),
        )
        batches = (resumed or {}).get("batches", 0)
        self.sync.manager.load_state_dict(
            {"step": handles.get_step(), "batches_committed": batches}
        )
        self.record = self.log_folder / "committed.jsonl"

    # ----- the manager's state callbacks (the quorum thread; the training thread waits) -----
    def state_dict(self) -> dict:
        h = self.handles
        return {
            "step": h.get_step(),
            "loader": h.loader_state(),
            "tensors": live_state(h.model, h.optimizers),
        }

    def recv_targets(self) -> dict:
        """Where a transport that receives in place writes the peer's state: this rank's own
        tensors (the tiers' caches are dropped first: their stores are overwritten)."""
        h = self.handles
        for tier in _tiers(h.model).values():
            tier.cache.invalidate()
        return {
            "user": {"default": {"tensors": live_state(h.model, h.optimizers, flush=False)}},
        }

    def load_state_dict(self, state: dict) -> None:
        h = self.handles
        load_live_state(h.model, h.optimizers, state["tensors"])
        h.load_loader_state(state["loader"])
        h.set_step(int(state["step"]))
        self._healed = True

    # ----- the step -----
    def begin_step(self) -> bool:
        """Join this step's quorum; a group that is behind takes its peer's state here.
        Returns whether it did (the job's state is then its peer's)."""
        started = time.perf_counter()
        self._healed = False
        self.sync.begin_step()
        if self._healed:
            self.recoveries += 1
            self.recovery_s = time.perf_counter() - started
            log.warning(
                "replica group %d recovered from a peer at step %d in %.2f s",
                self.cfg.replica_id,
                self.handles.get_step(),
                self.recovery_s,
            )
        return self._healed

    def end_step(self, start: dict) -> bool:
        """Record the step's outcome (group rank 0) and return whether it committed. A step that
        did not commit is retried with the same batches: the loader goes back to ``start``, its
        state when the step began."""
        h = self.handles
        committed = self.sync.committed
        batches = [int(start["consumed"]), h.batches_consumed()]
        if self.rank == 0:
            entry = {
                "step": h.get_step() + 1,
                "batches": batches,
                "replicas": self.sync.participants,
                "committed": committed,
            }
            with open(self.record, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        if committed:
            self.failed_in_a_row = 0
            return True
        self.failed_in_a_row += 1
        limit = self.cfg.max_failed_steps
        if limit and self.failed_in_a_row >= limit:
            raise ReplicasLost(
                f"{self.failed_in_a_row} steps in a row did not commit "
                f"(fault_tolerance.max_failed_steps={limit}); the last had "
                f"{len(self.sync.participants)} replica group(s) of min_replica_size="
                f"{self.cfg.min_replica_size}: check the other groups' logs and the lighthouse, "
                "or lower fault_tolerance.min_replica_size"
            )
        if self.failed_in_a_row == 1 or self.failed_in_a_row % 100 == 0:
            log.warning(
                "step %d did not commit (%d time(s) in a row: a replica group failed during it, "
                "or fewer than min_replica_size=%d took part): it is retried with the same "
                "batches %d..%d",
                h.get_step() + 1,
                self.failed_in_a_row,
                self.cfg.min_replica_size,
                batches[0],
                batches[1] - 1,
            )
        h.load_loader_state(start)
        return False

    @property
    def saves(self) -> bool:
        return self.sync.saves

    def scalars(self) -> dict[str, float]:
        return {
            "ft/replicas": float(len(self.sync.participants)),
            "ft/recoveries": float(self.recoveries),
            "ft/recovery_s": self.recovery_s,
        }

    def train_state(self) -> dict:
        return {"step": self.sync.step(), "batches": self.sync.manager.batches_committed()}

    def write_digest(self) -> dict:
        """``state_digest_rank<r>.json``: the sha256 of this rank's whole training state (the
        tensors in key order, their bytes) at this step; every group's rank r must agree."""
        h = self.handles
        record = {"step": h.get_step(), **state_digest(live_state(h.model, h.optimizers))}
        path = self.log_folder / f"state_digest_rank{self.rank}.json"
        path.write_text(json.dumps(record) + "\n")
        return record

    def shutdown(self) -> None:
        self.sync.shutdown()


def state_digest(state: dict[str, torch.Tensor]) -> dict:
    """sha256 over ``state``'s keys, dtypes, shapes and bytes (in key order), and its size."""
    digest = hashlib.sha256()
    nbytes = 0
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        nbytes += tensor.numel() * tensor.element_size()
    return {"sha256": digest.hexdigest(), "tensors": len(state), "bytes": nbytes}
