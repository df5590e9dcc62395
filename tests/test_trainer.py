"""Trainer end to end: SIGKILL + resume is bit-identical, checkpoint atomicity and corruption,
refusal of a mismatched hash configuration, NaN stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from parallel.sharding import RowBlocks
from pretrain import step as step_module
from pretrain.checkpoint import _state
from pretrain.config import load_config
from pretrain.train import Trainer

REPO = Path(__file__).resolve().parents[1]


def _overrides(corpus, dump, steps=24, workers=1):
    return [
        f"--job.dump_folder={dump}",
        f"--data.dataset_path={corpus}",
        "--data.prepare_if_missing=false",
        "--data.seq_len=64",
        f"--data.num_workers={workers}",
        "--training.batch_size=2",
        f"--training.steps={steps}",
        "--checkpoint.interval=4",
        "--checkpoint.keep_last=3",
        "--metrics.log_freq=1",
        "--metrics.eval_freq=1000",
        "--metrics.eval_batches=2",
        "--metrics.enable_tensorboard=false",
        "--lr_scheduler.warmup_steps=3",
        "--training.num_threads=1",
    ]


def _cmd(corpus, dump, **kw):
    return [
        sys.executable,
        "-m",
        "pretrain.train",
        "--config",
        "pretrain/configs/debug.toml",
        *_overrides(corpus, dump, **kw),
    ]


def _records(dump) -> dict[int, dict]:
    records = {}
    for line in (Path(dump) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record
    return records


def _run(cmd):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "placement, extra",
    [
        pytest.param("device", [], id="device"),
        pytest.param("disk", [], marks=pytest.mark.slow, id="disk"),
        pytest.param(  # FP8 linears and Engram GEMM (emulated; needs the [fp8] extra)
            "device",
            ["--quantize.linear.float8.enable=true", "--quantize.engram=true"],
            marks=pytest.mark.slow,
            id="fp8",
        ),
    ],
)
def test_sigkill_resume_is_bit_identical(corpus, tmp_path, placement, extra):
    """Also with the Engram tables on disk (rows and moments in a memory-mapped file behind a
    row cache, prefetched): the tables are streamed into the checkpoint and back; and in FP8."""
    table = [f"--engram_table.placement={placement}", "--engram_table.cache_size=20%", *extra]
    straight = tmp_path / "straight"
    result = _run(_cmd(corpus, straight) + table)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out loss" in result.stdout

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(corpus, killed) + table, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        if metrics.is_file() and max(_records(killed), default=0) >= 14:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(_records(killed)) < 24, "the run finished before it could be killed"
    result = _run(_cmd(corpus, killed) + table)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    want, got = _records(straight), _records(killed)
    assert sorted(got) == list(range(1, 25))
    for step in want:
        assert got[step]["loss"] == want[step]["loss"], step
        assert got[step]["grad_norm"] == want[step]["grad_norm"], step
    # the final model and optimizer states (Adam moments, row-wise table state) are bit-identical
    finished = [_trainer(corpus, folder, 24, table) for folder in (straight, killed)]
    assert [t.step for t in finished] == [24, 24]
    _assert_equal_trees(*(_state(t.model, t.optimizers, blocked=False) for t in finished))
    if placement == "disk":
        scalars = finished[0].engram_scalars()  # the tier metrics of the resumed trainer
        assert set(scalars) >= {"engram/cache_hit_rate", "engram/prefetch_wait(%)"}

    # the same folder with another Engram hash seed is refused with a clear message
    refused = _run(
        _cmd(corpus, killed, steps=30) + table + ["--model.overrides.engram.hash.seed=9"]
    )
    assert refused.returncode == 2
    if placement == "disk":  # the table files, pinned to their hash configuration, refuse first
        assert "Engram table of another configuration (differs in: hash_sha256)" in refused.stderr
    else:
        assert "different Engram hash configuration" in refused.stderr
        assert "multipliers" in refused.stderr


def _assert_equal_trees(a, b, path="state") -> None:
    assert type(a) is type(b), path
    if isinstance(a, RowBlocks):  # an offloaded table: compare its rows where they live
        a, b = a._source, b._source
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for key in a:
            _assert_equal_trees(a[key], b[key], f"{path}.{key}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_trees(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _trainer(corpus, dump, steps=6, extra=()):
    overrides = _overrides(corpus, dump, steps=steps, workers=0) + list(extra)
    return Trainer(load_config("pretrain/configs/debug.toml", overrides))


def test_bf16_autocast_and_grad_accumulation(corpus, tmp_path):
    extra = [
        "--training.mixed_precision=bf16",
        "--training.grad_accum_steps=2",
        "--checkpoint.enable=false",
    ]
    trainer = _trainer(
        corpus, tmp_path / "bf16", steps=3, extra=[*extra, "--lr_scheduler.warmup_steps=1"]
    )
    summary = trainer.fit()
    assert trainer.loader.consumed == 6  # 3 steps x 2 micro-batches
    records = _records(tmp_path / "bf16")
    assert sorted(records) == [1, 2, 3] and all(r["loss"] < 20 for r in records.values())
    assert summary["val_loss"] < 20


def test_the_step_reads_its_values_to_the_host_only_on_logging_steps(corpus, tmp_path):
    """train_step leaves loss, norm and aux losses on the device; fit reads them (one host
    synchronisation) on logging steps only, and logs what the step computed."""
    extra = ["--metrics.log_freq=2", "--checkpoint.enable=false"]
    trainer = _trainer(corpus, tmp_path / "log", steps=4, extra=extra)
    reads, original = [], trainer.host_values

    def host_values(values):
        assert torch.is_tensor(values["loss"]) and torch.is_tensor(values["grad_norm"])
        assert all(torch.is_tensor(v) for v in values["aux"].values())
        out = original(values)
        reads.append((trainer.step, out["loss"], float(values["loss"])))
        return out

    trainer.host_values = host_values
    trainer.fit()
    assert [step for step, *_ in reads] == [2, 4]
    assert all(logged == computed for _, logged, computed in reads)
    records = _records(tmp_path / "log")
    assert sorted(records) == [2, 4] and records[4]["loss"] == reads[-1][1]


def test_interrupted_save_and_corrupt_checkpoint_are_skipped(corpus, tmp_path, monkeypatch, caplog):
    dump = tmp_path / "run"
    trainer = _trainer(corpus, dump, steps=8)
    trainer.fit()  # checkpoints at 4 and 8
    ckpt_dir = dump / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-00000004", "step-00000008"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(os, "replace", crash)
    trainer.step = 12
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert (ckpt_dir / "step-00000012.tmp").is_dir()

    for shard in (ckpt_dir / "step-00000008").glob("*.distcp"):
        shard.write_bytes(b"garbage")
    resumed = _trainer(corpus, dump, steps=8)
    assert not (ckpt_dir / "step-00000012.tmp").exists()
    assert resumed.step == 4 and "step-00000008 is corrupt" in caplog.text


def test_nan_loss_stops_and_keeps_last_checkpoint(corpus, tmp_path, monkeypatch):
    dump = tmp_path / "nan"
    trainer = _trainer(corpus, dump, steps=8)
    original = step_module.forward_loss

    def poisoned(sm, batch):
        ce, aux = original(sm, batch)
        return (ce * float("nan") if trainer.step >= 5 else ce), aux

    monkeypatch.setattr(step_module, "forward_loss", poisoned)
    saved = {}
    original_save = trainer.save

    def snapshot_save(**kwargs):
        original_save(**kwargs)
        saved.update({k: v.clone() for k, v in trainer.inner.state_dict().items()})

    trainer.save = snapshot_save
    with pytest.raises(FloatingPointError, match="step 6.*step-00000004"):
        trainer.fit()
    again = _trainer(corpus, dump, steps=8)
    assert again.step == 4
    for name, value in again.inner.state_dict().items():
        assert torch.equal(value, saved[name]), name


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)],
    ids=["sigterm", "sigusr1"],
)
def test_preemption_signal_checkpoints_and_resumes_bit_identically(corpus, tmp_path, sig):
    """A signal mid-run: the step in flight finishes, a checkpoint is written at that step (off
    the checkpoint interval), the job exits 0; the resumed job matches the straight run."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    cmd = _cmd(corpus, straight, steps=14)
    assert _run(cmd).returncode == 0
    proc = subprocess.Popen(
        _cmd(corpus, stopped, steps=14), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if (stopped / "metrics.jsonl").is_file() and max(_records(stopped), default=0) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    done = max(_records(stopped))
    assert done < 14, "the run finished before the signal"
    assert f"stopped at step {done}" in err.decode()
    ckpts = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    assert ckpts[-1] == f"step-{done:08d}"  # saved at the stop, not only at the interval
    assert _run(_cmd(corpus, stopped, steps=14)).returncode == 0
    want, got = _records(straight), _records(stopped)
    assert sorted(got) == list(range(1, 15))
    for step in want:
        assert (got[step]["loss"], got[step]["grad_norm"]) == (
            want[step]["loss"],
            want[step]["grad_norm"],
        ), step
    finished = [_trainer(corpus, folder, steps=14) for folder in (straight, stopped)]
    _assert_equal_trees(*(_state(t.model, t.optimizers) for t in finished))


@pytest.mark.slow  # CLI end to end
@pytest.mark.distributed
def test_preemption_through_the_slurm_node_script(corpus, tmp_path):
    """launch/slurm/node.sh as slurm runs it on a node (torchrun, 2 ranks): SIGUSR1 to the node
    script reaches the trainers (torchrun itself ignores it), which checkpoint and exit 0."""
    from tests.distributed.helpers import free_port

    dump = tmp_path / "node"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_ID="test",
        GPUS_PER_NODE="2",
        HEAD="127.0.0.1",
        PORT=str(free_port()),
        LOG_DIR=str(tmp_path / "logs"),
    )
    args = [
        "--config",
        "pretrain/configs/debug.toml",
        *_overrides(corpus, dump, steps=40, workers=0),
        "--parallelism.data_parallel_replicate_degree=2",
    ]
    proc = subprocess.Popen(
        ["bash", "launch/slurm/node.sh", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if (dump / "metrics.jsonl").is_file() and max(_records(dump), default=0) >= 3:
            break
        time.sleep(0.05)
    # as slurm may signal every process of the step: the script and torchrun
    agents = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    proc.send_signal(signal.SIGUSR1)
    for pid in agents.stdout.split():
        os.kill(int(pid), signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    done = max(_records(dump))
    assert done < 40
    assert sorted(p.name for p in (dump / "checkpoints").iterdir())[-1] == f"step-{done:08d}"
    assert list((tmp_path / "logs").rglob("*.log")), "no per-rank logs"


def test_async_checkpoint_resume_is_bit_identical(corpus, tmp_path):
    """``checkpoint.async_mode=async``: saves complete in the background (meta.json and the
    rename come with the next save or the end of the job) from a host copy, so the checkpoint of
    step 4, written while steps 5-8 trained, resumes to match a straight synchronous run."""
    async_mode = ["--checkpoint.async_mode=async"]
    first = _trainer(corpus, tmp_path / "async", steps=12, extra=async_mode)
    step = first.train_step

    def signal_at_8():
        values = step()
        if first.step == 8:
            os.kill(os.getpid(), signal.SIGUSR1)
        return values

    first.train_step = signal_at_8
    assert first.fit()["preempted"]
    ckpts = sorted(p.name for p in (tmp_path / "async" / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000008"]
    # step 4's checkpoint was written while steps 5-8 trained: resume from it
    shutil.rmtree(tmp_path / "async" / "checkpoints" / "step-00000008")
    resumed = _trainer(corpus, tmp_path / "async", steps=12, extra=async_mode)
    assert resumed.step == 4
    resumed.fit()
    straight = _trainer(corpus, tmp_path / "sync", steps=12)
    straight.fit()
    want, got = _records(tmp_path / "sync"), _records(tmp_path / "async")
    assert sorted(got) == list(range(1, 13))
    assert all(got[s]["loss"] == want[s]["loss"] for s in want)
    _assert_equal_trees(*(_state(t.model, t.optimizers) for t in (straight, resumed)))


def test_eta_is_the_remaining_steps_at_the_mean_step_time(tmp_path, monkeypatch):
    from pretrain import metrics
    from pretrain.config import MetricsConfig

    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    cfg = MetricsConfig(enable_tensorboard=False, progress_bar=False)
    logger = metrics.MetricsLogger(cfg, tmp_path, 1, 100, 20, torch.device("cpu"))
    now[0] = 130.0  # 30 steps (20 -> 50) in 30 s: 50 steps left take 50 s
    assert logger.eta_seconds(50) == pytest.approx(50.0)
    assert logger.eta_seconds(100) is None
    assert [metrics.format_duration(s) for s in (50, 245, 3725)] == ["50s", "4m05s", "1h02m"]


class _CountingLinear(torch.nn.Linear):
    """What a converter swaps in: the same maths, counted."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


class _SwapOutputs:
    """A model converter: every attention's ``wo`` becomes a ``_CountingLinear``, on meta."""

    def __init__(self):
        self.converted, self.hooks, self.devices = [], 0, set()

    def convert(self, model):
        for name, module in model.named_modules():
            if name.endswith("attention"):
                module.wo.__class__ = _CountingLinear
                self.converted.append(f"{name}.wo")
                self.devices.add(module.wo.weight.device.type)

    def post_optimizer_hook(self, model):
        self.hooks += 1


def test_model_family_selects_its_spec_and_applies_its_converters(corpus, tmp_path):
    """``model.family`` picks a registered ``ModelSpec``: its model class, its parallelize
    function and its converters, each built from its own config section, applied on the meta
    device before parallelisation, and hooked after every optimizer step."""
    import dataclasses

    from models.spec import get_model_spec, register_model_spec, unregister_model_spec

    made, sections = [], []

    def factory(section):
        sections.append(section)
        made.append(_SwapOutputs())
        return made[-1]

    base = get_model_spec("deepseek_engram")
    register_model_spec(
        dataclasses.replace(base, name="counted", converters={"activation_checkpoint": factory})
    )
    try:
        extra = ["--model.family=counted", "--checkpoint.enable=false"]
        extra += ["--lr_scheduler.warmup_steps=1"]
        trainer = _trainer(corpus, tmp_path / "counted", steps=3, extra=extra)
        trainer.fit()
    finally:
        unregister_model_spec("counted")
    (converter,) = made
    assert sections == [trainer.cfg.activation_checkpoint]  # its own section, not the root
    assert converter.devices == {"meta"} and converter.hooks == 3
    layers = trainer.args.num_layers
    assert converter.converted == [f"layers.{i}.attention.wo" for i in range(layers)]
    assert _CountingLinear.calls >= 3 * layers  # the swapped modules trained
    with pytest.raises(ValueError, match="model.family='nope'.*deepseek_engram"):
        load_config("pretrain/configs/debug.toml", ["--model.family=nope"])
