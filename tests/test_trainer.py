"""Trainer end to end: SIGKILL + resume is bit-identical, checkpoint atomicity and corruption,
refusal of a mismatched hash configuration, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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


def test_sigkill_resume_is_bit_identical(corpus, tmp_path):
    straight = tmp_path / "straight"
    result = _run(_cmd(corpus, straight))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out loss" in result.stdout

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(corpus, killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
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
    result = _run(_cmd(corpus, killed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    want, got = _records(straight), _records(killed)
    assert sorted(got) == list(range(1, 25))
    for step in want:
        assert got[step]["loss"] == want[step]["loss"], step
        assert got[step]["grad_norm"] == want[step]["grad_norm"], step
    # the final model and optimizer states (Adam moments, row-wise table state) are bit-identical
    finished = [_trainer(corpus, folder, steps=24) for folder in (straight, killed)]
    assert [t.step for t in finished] == [24, 24]
    _assert_equal_trees(*(_state(t.model, t.optimizers) for t in finished))

    # the same folder with another Engram hash seed is refused with a clear message
    refused = _run(_cmd(corpus, killed, steps=30) + ["--model.overrides.engram.hash.seed=9"])
    assert refused.returncode == 2
    assert (
        "different Engram hash configuration" in refused.stderr and "multipliers" in refused.stderr
    )


def _assert_equal_trees(a, b, path="state") -> None:
    assert type(a) is type(b), path
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

    def snapshot_save():
        original_save()
        saved.update({k: v.clone() for k, v in trainer.inner.state_dict().items()})

    trainer.save = snapshot_save
    with pytest.raises(FloatingPointError, match="step 6.*step-00000004"):
        trainer.fit()
    again = _trainer(corpus, dump, steps=8)
    assert again.step == 4
    for name, value in again.inner.state_dict().items():
        assert torch.equal(value, saved[name]), name
