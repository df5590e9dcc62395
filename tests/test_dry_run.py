"""Dry runs of the paper recipes at their launch layouts (meta device, fake process group)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.dry_run import dry_run

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["dense_4b", "moe_27b", "engram_27b", "engram_40b", "engram_27b_32k"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_fit_their_layouts(recipe):
    result = dry_run(f"launch/configs/{recipe}.toml", [], world_size=32, rank=5, gpu_memory_gib=80)
    assert result["fits"], result
    assert result["peak_gib"] > 5  # a real estimate, not an empty model
    if recipe.startswith("engram"):
        # tables are row-sharded: every rank holds 1/32 of them (32K: over dp 8 x cp 4)
        engram_tables = {"engram_40b": 18.587e9}.get(recipe, 5.787e9)
        assert result["rank_table_params"] == pytest.approx(engram_tables / 32, rel=0.01)


@pytest.mark.slow  # CLI end to end
def test_cli_json_and_exit_code_when_it_does_not_fit():
    cmd = [
        sys.executable,
        "-m",
        "launch.dry_run",
        "--config",
        "launch/configs/moe_27b.toml",
        "--analytical",  # the traced step: tests/test_simulator.py
    ]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["fits"] is True
    small = subprocess.run(
        cmd + ["--gpu_memory_gib", "24"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert small.returncode == 1
    assert json.loads(small.stdout.strip().splitlines()[-1])["fits"] is False


def test_32k_extension_fits_only_with_context_parallelism():
    """At 32K tokens the sequence's activations and logits need the cp 4 split: the same job
    with cp 1 (dp_shard 32) does not fit 80 GB."""
    cp1 = ["--parallelism.context_parallel_degree=1", "--parallelism.data_parallel_shard_degree=32"]
    whole = dry_run("launch/configs/engram_27b_32k.toml", cp1, 32, 0, 80)
    split = dry_run("launch/configs/engram_27b_32k.toml", [], 32, 0, 80)
    assert split["fits"] and not whole["fits"]
    assert whole["memory_gib"]["activations_gib"] > 3.5 * split["memory_gib"]["activations_gib"]


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        ([], 30, "is not divisible|!= world size"),
        (["--parallelism.expert_parallel_degree=5"], 32, "expert_parallel_degree=5 must divide"),
        (["--parallelism.engram_shard_degree=8"], 32, "engram_shard_degree=8"),
        (
            [
                "--parallelism.context_parallel_degree=2",
                "--parallelism.data_parallel_shard_degree=16",
                "--parallelism.engram_shard_degree=16",
            ],
            32,
            "engram_shard_degree=16: the tables are sharded over the ranks that hold different",
        ),
    ],
)
def test_bad_layouts_fail_before_any_process_group(overrides, world, message):
    import torch.distributed as dist

    with pytest.raises(ValueError, match=message):
        dry_run("launch/configs/engram_27b.toml", overrides, world, 0, 80)
    assert not dist.is_initialized()
