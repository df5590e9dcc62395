"""Fault-tolerant replica groups (torchft): lose a group, keep training, rejoin bit-identically.

The end-to-end tests run the training CLI as 2 replica groups x 2 gloo ranks (FSDP and Engram
table parallelism inside each group) against a lighthouse in this process, on 127.0.0.1:
- a group SIGKILLed mid-run: the other keeps committing, the restarted group recovers from its
  peer and rejoins, and at the end both hold the same bits (sha256 of every rank's parameters,
  buffers, optimizer states and table rows); the loss curve stays near the run without failure;
- the same with host-placed tables;
- both groups killed and restarted from the durable checkpoint end bit-identical to the run
  that was not stopped.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import re
import time
from pathlib import Path

import pytest
import torch

from launch.fault_drill import REPO, ReplicaGroups, start_lighthouse
from parallel.distributed import free_port
from pretrain.config import FaultToleranceConfig

pytestmark = pytest.mark.distributed
os.environ.setdefault("RUST_LOG", "warn")  # the lighthouse logs every quorum at info
pytest.importorskip("torchft")
STEPS = 40
LOSS_TOLERANCE = 0.25  # per step, failure run vs the run without one (measured: at most 0.12)


@pytest.fixture(scope="module")
def lighthouse():
    server = start_lighthouse()
    yield server.address()
    server.shutdown()


def _corpus_args(corpus) -> list[str]:
    """The test corpus as the one source of a mixture (fault tolerance needs one), short rows."""
    return [
        f"--data.dataset_path={corpus}",
        "--data.prepare_if_missing=false",
        f'--data.mixture=[{{name="code", format="shards", path="{corpus}", weight=1.0}}]',
        "--data.seq_len=64",
        "--data.num_workers=0",
    ]


def _groups(corpus, dump: Path, lighthouse: str, extra=()) -> ReplicaGroups:
    args = [
        "--config",
        "pretrain/configs/debug.toml",
        *_corpus_args(corpus),
        "--training.batch_size=2",
        f"--training.steps={STEPS}",
        "--training.num_threads=1",
        "--lr_scheduler.warmup_steps=3",
        "--checkpoint.interval=10",
        "--metrics.log_freq=1",
        "--metrics.eval_freq=1000",
        "--metrics.eval_batches=4",
        "--metrics.enable_tensorboard=false",
        "--parallelism.engram_shard_degree=2",
        "--fault_tolerance.process_group_timeout_ms=3000",
        "--fault_tolerance.state_digest=true",
        *extra,
    ]
    return ReplicaGroups(dump, lighthouse, args, groups=2, ranks=2)


@pytest.fixture(scope="module")
def reference(corpus, lighthouse, tmp_path_factory) -> ReplicaGroups:
    """The run without failure; ``min_replica_size=2`` commits only steps both groups trained,
    so it does not depend on which group starts first."""
    dump = tmp_path_factory.mktemp("ft") / "reference"
    groups = _groups(corpus, dump, lighthouse, ["--fault_tolerance.min_replica_size=2"])
    groups.launch_all()
    groups.wait()
    return groups


def _assert_the_uninterrupted_schedule(run: ReplicaGroups) -> None:
    """Every group trained, at every step it logged (committed or retried), exactly the global
    batches of the uninterrupted schedule: one per step (a recovery that kept its own loader
    position would train batches of other steps)."""
    for group in range(run.groups):
        records = run.records(group, "committed.jsonl")
        assert records, group
        for record in records:
            assert record["batches"] == [record["step"] - 1, record["step"]], (group, record)


@pytest.mark.slow
@pytest.mark.parametrize(
    "placement,transport",
    # the state in place over gloo (into a disk table's memory map too); staged over HTTP
    [("device", "pg"), ("host", "http"), ("disk", "pg")],
)
def test_a_killed_group_recovers_from_its_peer_and_rejoins(
    corpus, lighthouse, reference, tmp_path, placement, transport
):
    extra = [
        f"--engram_table.placement={placement}",
        "--engram_table.cache_size=50%",
        f"--fault_tolerance.transport={transport}",
    ]
    run = _groups(corpus, tmp_path / "failure", lighthouse, extra)
    run.launch_all()
    run.wait_for_step(1, 8, with_peers=True)
    assert run.trained_together(1), "the groups never trained a step together before the kill"
    run.kill(1)
    killed_at = max(run.last_step(0), run.last_step(1))
    run.launch(1)
    run.wait()

    # 1. the surviving group kept committing alone, and its step never went back
    survivor = run.records(0, "committed.jsonl")
    steps = [r["step"] for r in survivor if r["committed"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[-1] == STEPS
    alone = [r["step"] for r in survivor if r["committed"] and r["replicas"] == [0]]
    assert [s for s in alone if s > killed_at], alone  # (alone at the start is possible too)
    # a step that did not commit was retried with the same batches
    for failed, retry in zip(survivor, survivor[1:]):
        if not failed["committed"]:
            assert (retry["step"], retry["batches"]) == (failed["step"], failed["batches"])
    # 2. the restarted group recovered from its peer (live, mid-run) and trained with it again
    rejoined = run.losses(1)
    # (its first run may have recovered too, at the start, if it was the later to start)
    recovered = [s for s, r in rejoined.items() if s > killed_at and r.get("ft/recoveries")]
    assert recovered, "the restarted group never rejoined"
    assert all(rejoined[s]["ft/recovery_s"] > 0 for s in recovered)
    last = run.records(1, "committed.jsonl")[-1]
    assert (last["step"], last["replicas"], last["committed"]) == (STEPS, [0, 1], True)
    _assert_the_uninterrupted_schedule(run)
    # 3. bit-identical: parameters, buffers, optimizer states and table rows of every rank
    assert run.digests(0) == run.digests(1)
    assert run.digests(0)[0]["step"] == STEPS
    # 4. the loss curve stays near the run without the failure (only the dead group's shares
    # of the steps it missed were not trained)
    want, got = reference.losses(0), run.losses(0)
    # (a group that starts later than its peer takes the peer's state and logs from there; on a
    # loaded machine that can be a few steps in, but never after the first step trained together)
    assert sorted(got) == list(range(min(got), STEPS + 1)) and min(got) <= killed_at
    worst = max(abs(got[s]["loss"] - want[s]["loss"]) for s in got)
    assert worst < LOSS_TOLERANCE, worst
    # the steps both groups trained together from the start equal the reference bit for bit
    together = 0
    for record in (r for r in survivor if r["committed"]):
        if record["step"] != together + 1 or record["replicas"] != [0, 1]:
            break
        together = record["step"]
    assert all(got[s]["loss"] == want[s]["loss"] for s in range(1, together + 1)), together
    # each group trained its own share of every batch
    assert got[STEPS]["loss"] != rejoined[STEPS]["loss"]


@pytest.mark.slow
def test_durable_resume_of_every_group_is_bit_identical(corpus, lighthouse, reference, tmp_path):
    extra = ["--fault_tolerance.min_replica_size=2"]
    run = _groups(corpus, tmp_path / "stopped", lighthouse, extra)
    run.launch_all()
    run.wait_for_step(0, 22)
    run.kill_all()
    assert run.last_step(0) < STEPS, "the run finished before it could be stopped"
    assert (run.dump / "checkpoints" / "step-00000020" / "meta.json").is_file()
    run.launch_all()
    run.wait()
    assert run.digests(0) == run.digests(1) == reference.digests(0)
    _assert_the_uninterrupted_schedule(run)
    want, got = reference.losses(0), run.losses(0)
    assert all(got[s]["loss"] == want[s]["loss"] for s in range(21, STEPS + 1))


# ----- the cross-replica reductions, on two single-rank groups -----


def _replica_worker(replica: int, address: str, out) -> None:
    torch.manual_seed(replica)
    from parallel.replicas import connect

    cfg = FaultToleranceConfig(
        enable=True,
        lighthouse=address,
        process_group_timeout_ms=5000,
        timeout_s=30,
        min_replica_size=2,
        replica_id=replica,
        group_size=2,
    )
    sync = connect(cfg, 0, 1, torch.device("cpu"), dict, lambda state: None)
    dense = torch.nn.Parameter(torch.zeros(3, 2))
    table = torch.nn.Parameter(torch.zeros(10, 2))
    dense.grad = torch.full((3, 2), float(replica + 1))
    rows = torch.tensor([[1, 4]]) if replica == 0 else torch.tensor([[4, 7, 9]])
    values = torch.arange(rows.shape[1] * 2, dtype=torch.float32).reshape(-1, 2) + 10 * replica
    table.grad = torch.sparse_coo_tensor(rows, values, (10, 2), check_invariants=False)
    sync.begin_step()
    sync.average_grads_([dense, table], sparse_tables=[table])
    committed = sync.commit()
    grad = table.grad.coalesce()
    local, summed = _moe_loads_through_the_step(sync, replica)
    out.put(  # plain values: a tensor's shared memory dies with this process
        (
            replica,
            dense.grad.tolist(),
            grad.is_sparse,
            grad.indices().tolist(),
            grad.values().tolist(),
            (local, summed),
            sync.participants,
            committed,
            sync.step(),
        )
    )
    sync.shutdown()


def _moe_loads_through_the_step(sync, replica: int) -> tuple[list, list]:
    """One real step (``forward_backward`` + ``optimizer_step``) of a tiny MoE model on this
    group's own batch: ``(its own routers' loads, the loads the bias update used)``."""
    from data.batch import plan_lookups
    from parallel.plan import ParallelPlan
    from pretrain.config import OptimizerConfig
    from pretrain.optimizer import Optimizers
    from pretrain.step import StepModel, forward_backward, lookup_planners, optimizer_step
    from tests.distributed.parity import initial_model, make_batch, model_args

    model = initial_model(model_args())
    sm = StepModel(model, model, ParallelPlan(replicas=sync))
    routers = [moe.router for moe in model.moe_layers()]
    used = []
    for router in routers:
        update = router.update_bias

        def recorded(loads=None, update=update, router=router):
            used.append(router.tokens_per_expert.tolist())
            update(loads)

        router.update_bias = recorded
    sync.begin_step()
    batch = plan_lookups(make_batch(10 + replica), lookup_planners(model), 1)
    forward_backward(sm, batch)
    local = [router.tokens_per_expert.tolist() for router in routers]
    optimizer_step(sm, Optimizers(model, OptimizerConfig()), 1.0)
    assert sync.committed
    return local, used


def test_gradients_and_loads_are_averaged_over_the_groups_as_rows():
    server = start_lighthouse(min_replicas=2)  # both groups in the first quorum
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_replica_worker, args=(r, server.address(), out)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = []
    try:
        deadline = time.time() + 120
        while len(results) < len(procs) and time.time() < deadline:
            try:
                results.append(out.get(timeout=1))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not dead, f"a replica process failed ({dead}): see its traceback above"
        assert len(results) == len(procs), "the replica processes did not finish in 120 s"
        results.sort(key=lambda r: r[0])
    finally:
        for proc in procs:
            proc.join(timeout=30)
        server.shutdown()
    (_, *_, (local_0, _), _, _, _), (_, *_, (local_1, _), _, _, _) = results
    for replica, dense, sparse, rows, values, loads, participants, committed, step in results:
        assert dense == [[1.5, 1.5]] * 3  # (1 + 2) / 2
        assert sparse, "the table gradient was densified"
        assert rows == [[1, 4, 7, 9]]  # the union of the groups' rows
        # row 4 is both groups' ([2, 3] + [10, 11]); every row is divided by the 2 groups
        assert values == [[0.0, 0.5], [6.0, 7.0], [6.0, 6.5], [7.0, 7.5]], replica
        assert (participants, committed, step) == ([0, 1], True, 2)
        # through the real step, each router's bias update saw the loads of both groups
        _, used = loads
        assert local_0 != local_1
        assert used == [
            [a + b for a, b in zip(x, y, strict=True)]
            for x, y in zip(local_0, local_1, strict=True)
        ]


def test_an_unreachable_lighthouse_is_a_clear_error_within_the_timeout():
    from parallel.replicas import LighthouseUnreachable, connect

    port = free_port()  # nothing listens there
    cfg = FaultToleranceConfig(
        enable=True, lighthouse=f"http://127.0.0.1:{port}", connect_timeout_s=2, group_size=1
    )
    started = time.perf_counter()
    with pytest.raises(LighthouseUnreachable, match="did not answer within connect_timeout_s=2"):
        connect(cfg, 0, 1, torch.device("cpu"), dict, lambda state: None)
    assert time.perf_counter() - started < 2 + 5


def test_fault_tolerance_config_errors_name_the_fix(tmp_path):
    from pretrain.config import load_config

    mixture = '--data.mixture=[{name="a", format="shards", path="x", weight=1.0}]'
    base = ["--fault_tolerance.enable=true"]
    cases = [
        ([], "set the number of replica groups"),
        (["--fault_tolerance.group_size=2", "--fault_tolerance.replica_id=2"], "[0, group_size=2)"),
        (
            ["--fault_tolerance.group_size=2", "--fault_tolerance.min_replica_size=3"],
            "[1, group_size=2]",
        ),
        (["--fault_tolerance.group_size=2"], "needs data.mixture"),
        (
            ["--fault_tolerance.group_size=2", mixture, "--checkpoint.async_mode=async"],
            "checkpoint.async_mode='disabled'",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(None, base + overrides)
    cfg = load_config(None, base + ["--fault_tolerance.group_size=2", mixture])
    assert cfg.fault_tolerance.group_size == 2


def _launcher_args(corpus, dump: Path, steps: int) -> list[str]:
    """The CPU recipe (2 groups x 2 ranks) on the test corpus, every step by both groups."""
    return [
        "--config",
        "pretrain/configs/debug_ft.toml",
        f"--job.dump_folder={dump}",
        *_corpus_args(corpus),
        f"--training.steps={steps}",
        "--lr_scheduler.warmup_steps=2",
        "--metrics.log_freq=1",
        "--metrics.enable_tensorboard=false",
        "--fault_tolerance.min_replica_size=2",
    ]


def _assert_trained_together(dump: Path, steps: int) -> None:
    for group in range(2):
        committed = (dump / f"replica_{group}" / "committed.jsonl").read_text().splitlines()
        done = [json.loads(line) for line in committed if '"committed": true' in line]
        assert [r["step"] for r in done] == list(range(1, steps + 1))
        assert all(r["replicas"] == [0, 1] for r in done)
        metrics = (dump / f"replica_{group}" / "metrics.jsonl").read_text()
        assert '"ft/replicas": 2.0' in metrics
    assert (dump / "checkpoints" / f"step-{steps:08d}" / "meta.json").is_file()


@pytest.mark.slow
def test_run_local_starts_the_lighthouse_and_the_replica_groups(corpus, tmp_path):
    """The CPU recipe through launch/run_local.sh: a lighthouse and 2 torchrun groups of 2."""
    import subprocess
    import sys

    dump = tmp_path / "local"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        FT_REPLICAS="2",
        NGPU="2",
        LIGHTHOUSE_PORT=str(free_port()),
        FT_JOIN_TIMEOUT_MS="1000",
    )
    result = subprocess.run(
        ["bash", "launch/run_local.sh", *_launcher_args(corpus, dump, steps=6)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_trained_together(dump, steps=6)


# slurm's two commands that train_ft.sbatch uses, for one machine: four "nodes" on 127.0.0.1.
# Real nodes each have the rendezvous port; here each job step's head gets its own
# (FAKE_PORT_<first node>).
FAKE_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || exit 1
for ((i = 0; i < FAKE_NODES; i++)); do echo 127.0.0.1; done
"""
FAKE_SRUN = """#!/usr/bin/env bash
for arg; do
  case $arg in
    --nodes=*) nodes=${arg#*=}; shift ;;
    --relative=*) relative=${arg#*=}; shift ;;
    --*) shift ;;
    *) break ;;
  esac
done
port=FAKE_PORT_$relative
pids=()
for ((task = 0; task < nodes; task++)); do
  SLURM_STEP_NUM_NODES=$nodes SLURM_PROCID=$task SLURM_NODEID=$((relative + task)) \
    PORT=${!port} "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


@pytest.mark.slow
def test_the_slurm_script_splits_the_nodes_into_replica_groups(corpus, tmp_path):
    """launch/slurm/train_ft.sbatch under a fake slurm (scontrol and srun on one machine): 4
    nodes of 1 rank become 2 replica groups of 2 nodes, each a multi-node torchrun job step
    (launch/slurm/node.sh) with its own rendezvous, joined by the lighthouse the script starts;
    both groups train every step together. Nodes that do not split evenly are refused."""
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHON=sys.executable,
        SLURM_JOB_NODELIST="node[1-4]",
        SLURM_JOB_ID="ft-test",
        SLURM_SUBMIT_DIR=str(REPO),
        FAKE_NODES="4",
        FAKE_PORT_0=str(free_port()),
        FAKE_PORT_2=str(free_port()),
        FT_REPLICAS="2",
        GPUS_PER_NODE="1",
        OMP_NUM_THREADS="1",
        LIGHTHOUSE_PORT=str(free_port()),
        FT_JOIN_TIMEOUT_MS="1000",
        LOG_DIR=str(tmp_path / "logs"),
    )
    dump = tmp_path / "slurm"
    sbatch = str(REPO / "launch" / "slurm" / "train_ft.sbatch")  # sbatch runs a copy of it
    script = ["bash", sbatch, *_launcher_args(corpus, dump, steps=4)]

    def run(**overrides):
        return subprocess.run(
            script,
            cwd=tmp_path,  # the script goes to SLURM_SUBMIT_DIR itself
            env={**env, **overrides},
            capture_output=True,
            text=True,
            timeout=600,
        )

    uneven = run(FT_REPLICAS="3")
    assert uneven.returncode == 2
    assert "FT_REPLICAS=3 does not divide the 4 nodes into equal groups" in uneven.stderr
    no_torchft = run(PYTHON=str(tmp_path / "bare" / "python"), PATH=f"{bin_dir}:/usr/bin:/bin")
    assert no_torchft.returncode == 2
    assert "torchft_lighthouse not found: pip install -e '.[ft]'" in no_torchft.stderr
    assert "or set TORCHFT_LIGHTHOUSE" in no_torchft.stderr
    result = run()
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_trained_together(dump, steps=4)
    logs = tmp_path / "logs"
    assert (logs / "lighthouse.log").is_file()
    for group in range(2):  # torchrun's per-rank logs, one folder per node of the group
        for node in range(2):
            assert list((logs / f"replica_{group}" / f"node{node}").rglob("*.log")), (group, node)


def test_a_group_alone_below_min_replica_size_stops_after_max_failed_steps(
    corpus, lighthouse, tmp_path
):
    """One single-process group of 2: no step can commit with min_replica_size=2, every step
    is retried with the same batches, and after max_failed_steps the group stops (exit 4)."""
    import subprocess
    import sys

    groups = _groups(corpus, tmp_path / "alone", lighthouse)
    cmd = [
        sys.executable,
        "-m",
        "pretrain.train",
        *groups.args,
        f"--job.dump_folder={groups.dump}",
        "--parallelism.engram_shard_degree=1",
        "--fault_tolerance.enable=true",
        "--fault_tolerance.group_size=2",
        f"--fault_tolerance.lighthouse={lighthouse}",
        "--fault_tolerance.min_replica_size=2",
        "--fault_tolerance.max_failed_steps=3",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stderr[-3000:]
    assert "3 steps in a row did not commit (fault_tolerance.max_failed_steps=3)" in result.stderr
    tried = groups.records(0, "committed.jsonl")
    assert [(r["step"], r["batches"], r["committed"]) for r in tried] == [(1, [0, 1], False)] * 3
