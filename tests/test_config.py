"""Config tree: TOML + CLI overrides, validation messages, the resolved config round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import load_config, to_toml

REPO_CONFIGS = sorted(str(p) for p in Path("pretrain/configs").glob("*.toml"))


@pytest.mark.parametrize("path", REPO_CONFIGS)
def test_repo_configs_load(path):
    from models.flavors import resolve_model_args

    cfg = load_config(path)
    assert cfg.model.flavor in ("debug", "demo")
    args = resolve_model_args(cfg.model.flavor, cfg.model.overrides, seq_len=cfg.data.seq_len)
    assert args.max_seq_len >= cfg.data.seq_len


def test_overrides_and_types():
    cfg = load_config(
        "pretrain/configs/debug.toml",
        [
            "--job.dump_folder=/tmp/x",
            "--model.flavor",
            "demo",
            "--training.steps=7",
            "--training.seed=3",
            "--checkpoint.interval=2",
            "--checkpoint.keep_last=4",
            "--metrics.log_freq=1",
            "--optimizer.lr=1e-4",
            "--optimizer.betas=[0.8, 0.9]",
            "--model.overrides.moe.top_k=3",
            "--checkpoint.enable=false",
        ],
    )
    assert (cfg.job.dump_folder, cfg.model.flavor, cfg.training.steps, cfg.training.seed) == (
        "/tmp/x",
        "demo",
        7,
        3,
    )
    assert (cfg.checkpoint.interval, cfg.checkpoint.keep_last, cfg.metrics.log_freq) == (2, 4, 1)
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.betas == [0.8, 0.9]
    assert cfg.model.overrides == {"moe.top_k": 3} and cfg.checkpoint.enable is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("--training.steps=0", "training.steps=0: must be > 0"),
        ("--training.stepz=3", "unknown config key training.stepz"),
        ("--trainin.steps=3", "unknown config section"),
        ("--training.steps=abc", "training.steps='abc': expected int"),
        ("--lr_scheduler.name=linear", "lr_scheduler.name='linear'"),
        ("--training.mixed_precision=fp8", "training.mixed_precision"),
        ("--checkpoint.keep_last=0", "checkpoint.keep_last=0"),
    ],
)
def test_validation_names_the_field(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("pretrain/configs/debug.toml", [override])


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config("pretrain/configs/demo.toml", ["--model.overrides.engram.seed=4"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(str(path)) == cfg
