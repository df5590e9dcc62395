"""A dead rank makes the others stop with an error within the process-group timeout, not hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.helpers import free_port

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, sys, time, torch, torch.distributed as dist
from parallel.distributed import init_distributed
init_distributed("cpu", timeout_seconds=int(os.environ["TIMEOUT"]))
dist.barrier()
if dist.get_rank() == 1:
    os._exit(9)  # dies without a word, like a crashed node
time.sleep(1)
dist.all_reduce(torch.ones(4))
dist.barrier()
print("survived", flush=True)
"""


def test_dead_rank_makes_the_other_fail_fast():
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            TIMEOUT="15",
            PYTHONPATH=str(REPO),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", SCRIPT],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    start = time.time()
    out0, err0 = procs[0].communicate(timeout=120)
    procs[1].wait(timeout=60)
    assert procs[1].returncode == 9
    assert procs[0].returncode != 0 and "survived" not in out0
    assert time.time() - start < 60, "the surviving rank hung instead of failing"
