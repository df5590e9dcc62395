"""Spawn gloo ranks on one machine for parity tests (one process per rank, TCP rendezvous).

Starting ranks costs 2-5 s (interpreter, torch, the project's imports, the rendezvous), most of a
2-rank parity test. So ``run_ranks`` keeps one pool of ranks per world size alive for a test
module (``tests/distributed/conftest.py`` closes the pools after each module: what a module's
tests leave running in the ranks, such as a table tier's threads, goes with them) and sends each
test's function to it; a test whose ranks start and end their own process group (the trainer's)
asks for ``fresh`` processes. A failure anywhere retires the pool:
the next call starts new ranks, so one broken test cannot leave the others a hung collective.

A rank that dies of a memory fault (SIGSEGV, SIGBUS: a crash inside torch or gloo, not a test's
failure) has its call run once more on new ranks, with a warning that carries the Python stacks
of the crashed rank's threads (faulthandler); a second crash fails the test. Exceptions, wrong
results and hangs are never retried.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import pickle
import queue as queue_module
import signal
import tempfile
import traceback
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.distributed import free_port  # noqa: F401 - the tests' import of it

MEMORY_FAULTS = (-signal.SIGSEGV, -signal.SIGBUS)  # multiprocessing's exit code of a signal


def _stack_file(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"engram-test-rank-{pid}.stack"


def _join_world(rank: int, world: int, port: int) -> None:
    # a rank that crashes leaves its threads' Python stacks where the parent can read them
    global _STACKS
    _STACKS = _stack_file(os.getpid()).open("w")
    faulthandler.enable(file=_STACKS, all_threads=True)  # the parent removes the file
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _call(rank: int, world: int, fn, args) -> tuple:
    try:
        # plain pickle bytes: no shared-memory handles that die with this process
        return rank, "ok", pickle.dumps(fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent test
        return rank, "error", traceback.format_exc()


def _entry(rank: int, world: int, port: int, fn, args, results) -> None:
    """A fresh rank: one function, then the process ends."""
    try:
        _join_world(rank, world, port)
        results.put(_call(rank, world, fn, args))
    except BaseException:  # noqa: BLE001
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _serve(rank: int, world: int, port: int, tasks, results, parent: int) -> None:
    """A pooled rank: functions from ``tasks`` until ``None``, or until the parent is gone."""
    try:
        _join_world(rank, world, port)
    except BaseException:  # noqa: BLE001
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        try:
            task = tasks.get(timeout=5)
        except queue_module.Empty:
            if os.getppid() != parent:  # orphaned: the test session died
                break
            continue
        if task is None:
            break
        results.put(_call(rank, world, *task))
    dist.destroy_process_group()


class RankCrashed(AssertionError):
    """A rank died of a memory fault; the message has its stacks."""


def _exit_text(code: int | None) -> str:
    return f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit {code}"


def _collect(procs, results, world: int, timeout: float) -> dict[int, object]:
    """Every rank's result; after the first error, the others get a few seconds (they may be
    blocked in a collective the failed rank never reached)."""
    found, errors = {}, []
    for _ in range(world):
        try:
            rank, status, payload = results.get(timeout=5 if errors else timeout)
        except queue_module.Empty:
            dead = [
                f"rank {r} (pid {p.pid}, {_exit_text(p.exitcode)})"
                for r, p in enumerate(procs)
                if not p.is_alive()
            ]
            errors.append(f"ranks timed out (dead: {', '.join(dead) or 'none'})")
            break
        if status == "ok":
            found[rank] = pickle.loads(payload)
        else:
            errors.append(f"rank {rank}:\n{payload}")
    if not errors:
        return found
    crashed = [(r, p) for r, p in enumerate(procs) if p.exitcode in MEMORY_FAULTS]
    if crashed:
        stacks = []
        for rank, proc in crashed:
            path = _stack_file(proc.pid)
            text = path.read_text() if path.is_file() else "(no stack written)"
            path.unlink(missing_ok=True)
            stacks.append(f"rank {rank} (pid {proc.pid}) {_exit_text(proc.exitcode)}:\n{text}")
        raise RankCrashed("\n".join(stacks + errors))
    raise AssertionError("\n".join(errors))


class _RankPool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(
                target=_serve, args=(r, world, port, self.tasks[r], self.results, os.getpid())
            )
            for r in range(world)
        ]
        for proc in self.procs:
            proc.start()

    def run(self, fn, args, timeout: float) -> dict[int, object]:
        for tasks in self.tasks:
            tasks.put((fn, args))
        return _collect(self.procs, self.results, self.world, timeout)

    def close(self, kill: bool = False) -> None:
        """Stop the ranks (``kill``: at once, as after a failure, when they may be blocked)."""
        for tasks, proc in zip(self.tasks, self.procs, strict=True):
            if proc.is_alive() and not kill:
                tasks.put(None)
        for proc in self.procs:
            proc.join(timeout=0 if kill else 10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            _stack_file(proc.pid).unlink(missing_ok=True)


_POOLS: dict[int, _RankPool] = {}


@atexit.register
def close_pools() -> None:
    """Stop every pool (after a test module; at exit)."""
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def run_ranks(fn, world: int, *args, timeout: float = 300, fresh: bool = False) -> dict:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; returns each rank's result.

    ``fresh``: start new processes for this call only (for functions that set up or tear down
    the default process group themselves); otherwise the module's pool of ``world`` ranks runs
    it. ``fn`` and ``args`` must pickle (a module-level function). A memory fault in a rank
    runs the call once more on new ranks (see the module's docstring).
    """
    try:
        return _run_once(fn, world, args, timeout, fresh)
    except RankCrashed as crash:
        warnings.warn(
            f"a rank crashed running {fn.__name__}; running it again on new ranks:\n{crash}",
            stacklevel=2,
        )
    return _run_once(fn, world, args, timeout, fresh)


def _run_once(fn, world: int, args: tuple, timeout: float, fresh: bool) -> dict:
    if fresh:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        port = free_port()
        procs = [
            ctx.Process(target=_entry, args=(r, world, port, fn, args, results))
            for r in range(world)
        ]
        for proc in procs:
            proc.start()
        try:
            return _collect(procs, results, world, timeout)
        finally:
            for proc in procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                _stack_file(proc.pid).unlink(missing_ok=True)
    pool = _POOLS.get(world)
    if pool is None:
        pool = _POOLS[world] = _RankPool(world)
    try:
        return pool.run(fn, args, timeout)
    except BaseException:
        _POOLS.pop(world).close(kill=True)  # a failed call may leave ranks mid-collective
        raise
