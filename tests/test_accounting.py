"""Accounting: paper flavors match their published totals and are iso-FLOP; every flavor's
closed-form counts equal a meta-device model's numel."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models.flavors import FLAVORS
from models.summary import summarize

TARGETS = {"dense-4b": 4.1e9, "moe-27b": 26.7e9, "engram-27b": 26.7e9, "engram-40b": 39.5e9}


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_meta_cross_check(flavor):
    assert summarize(flavor)["meta_checked"]


@pytest.mark.parametrize("flavor, target", sorted(TARGETS.items()))
def test_paper_totals_within_one_percent(flavor, target):
    total = summarize(flavor)["total_params"]
    assert abs(total - target) / target < 0.01, total


def test_paper_activated_and_engram_sizes():
    for flavor in TARGETS:
        activated = summarize(flavor)["activated_params"]
        assert abs(activated - 3.8e9) / 3.8e9 < 0.02, (flavor, activated)
    assert abs(summarize("engram-27b")["engram_params"] - 5.7e9) / 5.7e9 < 0.05
    assert abs(summarize("engram-40b")["engram_params"] - 18.5e9) / 18.5e9 < 0.02


def test_iso_flop():
    flops = [summarize(f)["flops_per_token"] for f in ("moe-27b", "engram-27b", "engram-40b")]
    assert (max(flops) - min(flops)) / min(flops) < 0.01, flops


@pytest.mark.slow  # CLI end to end
def test_summary_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "models.summary", "engram-27b", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    for key in ("total_params", "activated_params", "engram_params", "flops_per_token"):
        assert result[key] > 0
