"""The replicate dimension under fault tolerance: replica groups joined and dropped by torchft.

Each replica group is one copy of the whole layout (FSDP, TP, PP, EP and the table shards
inside it) and one torchrun job of its own. Rank ``r`` of every group holds the same shard of
the same state, so the groups' ranks ``r`` form one torchft process group (reconfigured by the
manager at every quorum change) over which this rank's gradients are averaged. torchft's
lighthouse decides, step by step, which groups take part; a step commits only when they agree.

What crosses the groups each step (``ReplicaSync``):
- dense gradients (the local shards left by FSDP's reduce-scatter), averaged in buckets;
- sparse Engram table gradients as their unique rows: counts, then rows and values are
  gathered (padded to the longest), summed over the union of the rows, and averaged. A table
  is never densified;
- MoE load counts, summed, so every group takes the same auxiliary-loss-free bias step;
- which groups took part (a one-hot sum), for the record of trained batches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from datetime import timedelta

import torch
from torch import nn

from parallel.data_parallel import gather_rows, local_grad

log = logging.getLogger(__name__)
BUCKET_BYTES = 64 << 20  # dense gradients are averaged in flat buckets of at most this size


class LighthouseUnreachable(ConnectionError):
    pass


def lighthouse_address(configured: str) -> str:
    address = configured or os.environ.get("TORCHFT_LIGHTHOUSE", "")
    if not address:
        raise ValueError(
            "fault_tolerance.enable needs the lighthouse's address: set "
            "fault_tolerance.lighthouse='http://HOST:29510' or TORCHFT_LIGHTHOUSE (start it with "
            "`torchft_lighthouse --min_replicas 1`; launch/run_local.sh does with FT_REPLICAS=N)"
        )
    return address


def store_address() -> tuple[str, int, object]:
    """This group's TCP store (torchrun's), where the manager publishes its address; a single
    process without torchrun gets a store of its own (kept alive by the returned handle)."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None
    from torch.distributed import TCPStore

    from parallel.distributed import free_port

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    return "127.0.0.1", port, store


def connect(
    ft_cfg,
    group_rank: int,
    group_world: int,
    device: torch.device,
    state_dict,
    load_state_dict,
    agree=lambda ok: ok,
    recv_targets=None,
    host_tables: bool = False,
):
    """torchft's manager for this rank: its server on group rank 0, a client on the others, and
    the checkpoint transport (``_transport``). An unreachable lighthouse fails every rank of the
    group within ``connect_timeout_s`` (``agree(ok) -> bool``: the group's logical AND of
    ``ok``)."""
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

    os.environ.setdefault("RUST_LOG", "warn")  # the lighthouse client logs every quorum at info
    for name in ("torchft.manager", "torchft.checkpointing.http_transport"):
        logging.getLogger(name).setLevel(logging.WARNING)  # and so does the manager, every step
    lighthouse = lighthouse_address(ft_cfg.lighthouse)
    host, port, own_store = store_address()
    pg_timeout = timedelta(milliseconds=ft_cfg.process_group_timeout_ms)
    pg = ProcessGroupNCCL(pg_timeout) if device.type == "cuda" else ProcessGroupGloo(pg_timeout)
    timeout = timedelta(seconds=ft_cfg.timeout_s)
    kwargs = dict(
        pg=pg,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=ft_cfg.min_replica_size,
        use_async_quorum=False,  # a recovering group loads its peer's state before its forward
        timeout=timeout,
        quorum_timeout=timeout,
        connect_timeout=timedelta(seconds=ft_cfg.connect_timeout_s),
        rank=group_rank,
        world_size=group_world,
        store_addr=host,
        store_port=port,
        lighthouse_addr=lighthouse,
        replica_id=f"replica_{ft_cfg.replica_id}",
        checkpoint_transport=_transport(ft_cfg, pg, timeout, device, recv_targets, host_tables),
        init_sync=False,  # every group initialises the same weights from training.seed
    )
    manager, error = None, None
    if group_rank == 0:  # the server first: the other ranks read its address from the store
        try:
            manager = Manager(**kwargs)
        except RuntimeError as err:
            error = err
    if not agree(error is None):
        raise LighthouseUnreachable(
            f"fault_tolerance.lighthouse={lighthouse} did not answer within "
            f"connect_timeout_s={ft_cfg.connect_timeout_s}: start it (`torchft_lighthouse "
            "--min_replicas 1 --bind [::]:29510`) or fix the address"
            + (f" ({str(error).splitlines()[0]})" if error else "")
        )
    if manager is None:
        manager = Manager(**kwargs)
    return ReplicaSync(manager, pg, ft_cfg.group_size, ft_cfg.replica_id, own_store)


def _transport(ft_cfg, pg, timeout, device, recv_targets, host_tables: bool):
    """How a recovering group receives its peer's state. ``pg``: the tensors cross the replica
    process group and land in place in ``recv_targets()`` (this rank's own tensors, the
    offloaded stores included); ``http``: each rank serves its state over HTTP and the receiver
    stages it in host memory. ``auto`` takes ``pg``, except on a GPU with offloaded tables,
    whose stores would have to pass through device memory whole."""
    kind = ft_cfg.transport
    if kind == "auto":
        kind = "http" if device.type == "cuda" and host_tables else "pg"
    if kind == "pg":
        from torchft.checkpointing.pg_transport import PGTransport

        return PGTransport(pg, timeout, device, state_dict=recv_targets)
    from torchft.checkpointing.http_transport import HTTPTransport

    return HTTPTransport(timeout=timeout, num_chunks=0)


class ReplicaSync:
    """One rank's link to the same rank of every other replica group, for one step at a time:
    ``begin_step`` (the quorum; a recovering group loads its peer's state there),
    ``average_grads_``, ``sum_``, then ``commit``."""

    def __init__(self, manager, pg, group_size: int, replica_id: int, store=None):
        self.manager, self.pg = manager, pg
        self.group_size, self.replica_id = group_size, replica_id
        self._store = store
        self.participants: list[int] = []  # replica ids whose batches this step trains
        self.committed = True  # the last step's vote

    def begin_step(self) -> None:
        self.manager.start_quorum()

    @property
    def num_participants(self) -> int:
        return self.manager.num_participants()

    @property
    def saves(self) -> bool:
        """This group writes the durable checkpoints: the first group of the current quorum."""
        return self.manager.participating_rank() == 0

    def step(self) -> int:
        return self.manager.current_step()

    # ----- collectives (an error is reported to the manager: the step then does not commit) -----
    def _failed(self) -> bool:
        return self.manager.errored() is not None

    def _wait(self, work) -> bool:
        try:
            work.wait()
        except Exception as err:  # noqa: BLE001 - a lost peer: this step is not committed
            log.warning("a cross-replica collective failed (%s): the step will not commit", err)
            self.manager.report_error(err)
            return False
        return True

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        from torch.distributed.distributed_c10d import AllgatherOptions

        out = [torch.empty_like(tensor) for _ in range(self.num_participants)]
        try:
            work = self.pg.allgather([out], [tensor], AllgatherOptions())
        except Exception as err:  # noqa: BLE001
            self.manager.report_error(err)
            return None
        return out if self._wait(work) else None

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the participating groups, in place."""
        from torch.distributed import ReduceOp

        if not self._failed():
            self._wait(self.manager.allreduce(tensor, reduce_op=ReduceOp.SUM))
        return tensor

    def _record_participants(self, device) -> None:
        onehot = torch.zeros(self.group_size, device=device)
        onehot[self.replica_id] = 1.0
        self.sum_(onehot)
        self.participants = [int(i) for i in torch.nonzero(onehot > 0.5).flatten().tolist()]

    @torch.no_grad()
    def average_grads_(self, params: Iterable[nn.Parameter], sparse_tables=()) -> None:
        """Average every gradient over the participating groups, in place: dense ones in flat
        buckets, the ``sparse_tables``' gradients as the union of their rows (offloaded tables
        make the extra rows resident for their update)."""
        params = list(params)
        device = params[0].device if params else torch.device("cpu")
        self._record_participants(device)
        tables = {id(p) for p in sparse_tables}
        dense, sparse = [], []
        for param in params:
            if not param.requires_grad:
                continue
            if id(param) in tables:
                sparse.append(param)
                continue
            if param.grad is None:  # every group must send the same buckets
                param.grad = torch.zeros_like(param)
            dense.append(local_grad(param.grad))
        for bucket in _buckets(dense):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            if self._failed() or not self._wait(self.manager.allreduce(flat)):
                return
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
        for param in sparse:
            if self._failed():
                return
            self._average_rows_(param)

    def _average_rows_(self, param: nn.Parameter) -> None:
        grad = param.grad
        width = param.shape[1]
        if grad is None:
            rows = torch.zeros(0, dtype=torch.int64, device=param.device)
            values = torch.zeros(0, width, dtype=param.dtype, device=param.device)
        else:
            if not grad.is_sparse:
                raise TypeError("a table's gradient must be sparse (rows) under fault tolerance")
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        gathered = gather_rows(rows, values, self._all_gather)
        if gathered is None:
            return
        rows, values = gathered
        summed = torch.sparse_coo_tensor(
            rows.unsqueeze(0), values, param.shape, check_invariants=False
        ).coalesce()
        param.grad = summed / self.num_participants
        tier = getattr(param, "engram_tier", None)
        if tier is not None:
            tier.include_rows(summed.indices()[0].cpu().numpy())

    def commit(self) -> bool:
        """The step's vote: True when every rank of every participating group finished it and
        there were at least ``min_replica_size`` groups."""
        self.committed = self.manager.should_commit()
        return self.committed

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, at most ``BUCKET_BYTES`` each."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for grad in grads:
        nbytes = grad.numel() * grad.element_size()
        last = buckets[-1] if buckets else None
        if (
            last is None
            or size + nbytes > BUCKET_BYTES
            or (last[0].dtype, last[0].device) != (grad.dtype, grad.device)
        ):
            buckets.append([grad])
            size = nbytes
        else:
            last.append(grad)
            size += nbytes
    return buckets
