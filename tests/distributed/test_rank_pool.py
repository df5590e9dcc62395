"""The test ranks' own harness (tests/distributed/helpers.py): a rank that dies of a memory fault
is reported with its stack and its call is run once more on new ranks; a rank that keeps
crashing, or one that raises, fails the test."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.distributed.helpers import RankCrashed, _stack_file, run_ranks

pytestmark = pytest.mark.distributed


def _crash_once(rank: int, world: int, marker: str) -> int:
    """Rank 1 segfaults the first time (no marker yet); then every rank sums its rank."""
    dist.barrier()
    if rank == 1 and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSEGV)
    import torch

    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return int(value.item())


def _crash_always(rank: int, world: int) -> None:
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    dist.barrier()


def _raise(rank: int, world: int) -> None:
    raise ValueError(f"rank {rank} refuses")


def test_a_crashed_rank_is_reported_and_its_call_runs_again(tmp_path):
    marker = tmp_path / "crashed"
    with pytest.warns(UserWarning, match="a rank crashed running _crash_once") as caught:
        assert run_ranks(_crash_once, 2, str(marker)) == {0: 1, 1: 1}
    report = str(caught[0].message)
    assert "rank 1 (pid " in report and "killed by SIGSEGV" in report
    assert "Fatal Python error: Segmentation fault" in report
    assert "_crash_once" in report  # the crashed rank's Python stack
    pid = int(marker.read_text())
    assert not _stack_file(pid).exists()  # read and removed


def test_a_rank_that_keeps_crashing_or_raises_fails_the_test():
    with pytest.warns(UserWarning), pytest.raises(RankCrashed, match="killed by SIGSEGV"):
        run_ranks(_crash_always, 2)
    with pytest.raises(AssertionError, match="rank 0 refuses") as failure:
        run_ranks(_raise, 2)
    assert not isinstance(failure.value, RankCrashed)
