"""Preemption: SIGTERM or SIGUSR1 asks the job to checkpoint at the next step boundary and exit 0.

Slurm sends SIGUSR1 ahead of the time limit (``--signal=USR1@120`` in launch/slurm/train.sbatch)
and SIGTERM on preemption or ``scancel``; torchrun forwards SIGTERM to its workers. The handler
only sets a flag: the step in flight finishes, then every rank agrees (the ranks may see the
signal at different steps) and the job saves a checkpoint and stops, so a requeued job resumes
exactly where this one stopped.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs the handlers; ``requested(group)`` is True on every rank once any rank got one."""

    def __init__(self, signals=SIGNALS):
        self.signal_name: str | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("%s received: checkpointing at the end of this step", self.signal_name)

    def requested(self, group=None) -> bool:
        """Agreed over ``group`` (a CPU/gloo group: one tiny host-side all-reduce per step)."""
        flag = torch.tensor([1 if self.signal_name else 0], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
