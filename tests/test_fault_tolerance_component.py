"""``FaultTolerance`` as a component: built from its config section and named handles, with no
trainer (``pretrain.train`` is never imported), it drives one step that commits and one that
does not against a real torchft lighthouse and manager in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchft")

REPO = Path(__file__).resolve().parents[1]


def _last_json(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter (nothing of the test process imported) and parse
    the last line it prints."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"RUST_LOG": "warn", **os.environ},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


_DRIVE = r"""
import json, sys
from pathlib import Path

import torch

from launch.fault_drill import start_lighthouse
from pretrain.config import FaultToleranceConfig, OptimizerConfig
from pretrain.fault_tolerance import FaultTolerance, TrainingHandles
from pretrain.optimizer import Optimizers

folder = Path(sys.argv[1])
server = start_lighthouse()
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
optimizers = Optimizers(model, OptimizerConfig(lr=0.1))
loader = {"consumed": 0}
step = [0]
handles = TrainingHandles(
    model=model,
    optimizers=optimizers,
    loader_state=lambda: dict(loader),
    load_loader_state=loader.update,
    batches_consumed=lambda: loader["consumed"],
    get_step=lambda: step[0],
    set_step=lambda s: step.__setitem__(0, s),
)
cfg = FaultToleranceConfig(
    enable=True, replica_id=0, group_size=1, lighthouse=server.address(), timeout_s=30
)
ft = FaultTolerance(
    cfg, handles, rank=0, world_size=1, device=torch.device("cpu"), log_folder=folder
)


def one_step(planted_error):
    healed = ft.begin_step()
    start = handles.loader_state()
    loader["consumed"] += 2  # two global batches
    model(torch.ones(3, 4)).square().sum().backward()
    ft.sync.average_grads_(model.parameters())
    if planted_error:  # a peer lost mid-step: the group's vote says no
        ft.sync.manager.report_error(RuntimeError("planted"))
    if ft.sync.commit():
        optimizers.step()
    else:
        optimizers.skip_step()
    optimizers.zero_grad()
    ok = ft.end_step(start)
    if ok:
        step[0] += 1
    return {"healed": healed, "committed": ok, "step": step[0], "consumed": loader["consumed"]}


before = {k: v.clone() for k, v in model.state_dict().items()}
first = one_step(False)
after_first = {k: v.clone() for k, v in model.state_dict().items()}
second = one_step(True)
unchanged = all(torch.equal(v, after_first[k]) for k, v in model.state_dict().items())
moved = not all(torch.equal(v, before[k]) for k, v in after_first.items())
ft.shutdown()
server.shutdown()
print(json.dumps({
    "first": first, "second": second, "unchanged": unchanged, "moved": moved,
    "trainer_imported": "pretrain.train" in sys.modules, "scalars": ft.scalars(),
}))
"""


def test_fault_tolerance_runs_from_its_section_and_handles_alone(tmp_path):
    out = _last_json(_DRIVE, str(tmp_path))
    assert not out["trainer_imported"]
    assert out["first"] == {"healed": False, "committed": True, "step": 1, "consumed": 2}
    # the failed step is not counted, and the loader is back where the step began
    assert out["second"] == {"healed": False, "committed": False, "step": 1, "consumed": 2}
    assert out["moved"] and out["unchanged"]
    records = [json.loads(line) for line in (tmp_path / "committed.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 1, "batches": [0, 2], "replicas": [0], "committed": True},
        {"step": 2, "batches": [2, 4], "replicas": [0], "committed": False},
    ]
    assert out["scalars"] == {"ft/replicas": 1.0, "ft/recoveries": 0.0, "ft/recovery_s": 0.0}


_LONE = r"""
import json, sys

import torch

from data.batch import plan_lookups
from launch.fault_drill import start_lighthouse
from parallel.plan import ParallelPlan
from parallel.replicas import connect
from pretrain.config import FaultToleranceConfig, OptimizerConfig
from pretrain.fault_tolerance import live_state
from pretrain.optimizer import Optimizers
from pretrain.step import StepModel, forward_backward, lookup_planners, optimizer_step
from tests.distributed.parity import initial_model, make_batch, model_args

server = start_lighthouse()
model = initial_model(model_args())
optimizers = Optimizers(model, OptimizerConfig(lr=1e-2))
sm = StepModel(model, model, ParallelPlan())
planners = lookup_planners(model)


def train_step(step):
    forward_backward(sm, plan_lookups(make_batch(step), planners, 1))
    optimizer_step(sm, optimizers, 0.5)


train_step(0)  # a plain step first: every optimizer holds its state
cfg = FaultToleranceConfig(
    enable=True, replica_id=0, group_size=2, min_replica_size=2, lighthouse=server.address(),
    timeout_s=30,
)
sm.plan.replicas = connect(cfg, 0, 1, torch.device("cpu"), dict, lambda state: None)
before = {k: v.clone() for k, v in live_state(model, optimizers).items()}
votes = []
for step in (1, 2, 3):  # alone, below min_replica_size: none of them may commit
    sm.plan.replicas.begin_step()
    train_step(step)
    votes.append(sm.plan.replicas.committed)
after = live_state(model, optimizers)
changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
sm.plan.replicas.shutdown()
server.shutdown()
kinds = sorted({k.split("/")[0] for k in before})
tables = [k for k in before if "table" in k]
print(json.dumps({"votes": votes, "changed": changed, "kinds": kinds, "tables": len(tables)}))
"""


def test_steps_that_do_not_commit_leave_every_tensor_bit_identical(tmp_path):
    """A group alone below ``min_replica_size`` runs the real step three times: none commits,
    and parameters, buffers, both optimizers' states and the table rows are bit-identical to
    what they were before (an update applied before the vote would have moved them)."""
    out = _last_json(_LONE)
    assert out["votes"] == [False, False, False]
    assert out["kinds"] == ["buffer", "optim0", "optim1", "param"] and out["tables"] >= 3
    assert out["changed"] == []
