"""The GPU acceptance script (``scripts/gpu_check.sh``, ``benchmarks/gpu_check.py``) proven on the
CPU: its dry run gives every key a GPU run gives, a part over its time limit is reported and the
others still run, and the wheels it carries to a device are the right ones."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_the_dry_run_gives_every_figure_of_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == last
    assert set(last) == {
        "dry",
        "device",
        "torch",
        "cuda",
        "seconds",
        "compiled_model_error",
        "parts",
    }
    assert last["compiled_model_error"] is None  # the calibration needs measured GPU steps
    assert last["dry"] is True and last["device"] == "cpu"
    assert list(last["parts"]) == gpu_check.ORDER
    skipped = {"calibrate"} | (set() if importlib.util.find_spec("torchao") else {"fp8"})
    for name, part in last["parts"].items():
        assert set(gpu_check.FIGURES[name]) <= set(part), name
        assert part["status"] == ("skipped" if name in skipped else "ok"), (name, part)
    parts = last["parts"]
    assert "measured on a GPU" in parts["calibrate"]["reason"]
    step = parts["step"]
    assert step["engram_vs_moe"] == pytest.approx(
        step["engram_tokens_per_s"] / step["moe_tokens_per_s"]
    )
    assert step["grouped_mm_arch"] == "cpu"  # the MoE's experts ran torch._grouped_mm
    assert parts["offload"]["bit_identical"] is True
    assert parts["host_syncs"]["forward_backward"] == 0
    assert parts["gpu_tests"]["skipped"] >= 1 and parts["gpu_tests"]["failed"] == 0
    if "fp8" not in skipped:  # FP8 emulated, eager, at the ladder's tiny widths
        fp8 = parts["fp8"]
        assert fp8["fp8_vs_bf16"] == pytest.approx(
            fp8["moe_fp8_tokens_per_s"] / fp8["moe_bf16_tokens_per_s"]
        )
        assert fp8["compiled"] is False and fp8["recipe"] == "rowwise"


def test_the_compiled_model_error_compares_the_prediction_with_the_fp8_parts_bf16_arm():
    results = {
        "step": {"status": "ok", "batch": 2, "seq": 4096},
        "calibrate": {"status": "ok", "predicted_compiled_step_s": {"moe-27b": 0.25}},
        "fp8": {"status": "ok", "moe_bf16_tokens_per_s": 8192 / 0.2},
    }
    assert gpu_check.compiled_model_error(results) == pytest.approx(0.25 / 0.2 - 1)
    results["fp8"] = {"status": "skipped", "moe_bf16_tokens_per_s": None}
    assert gpu_check.compiled_model_error(results) is None


def test_a_part_over_its_limit_is_reported_and_the_others_still_run(monkeypatch):
    """A sleep planted in the step part, under a 1-second limit: it is killed and reported as
    timed out, with its figures empty, and the parts before and after it run."""
    real = gpu_check.part_argv

    def planted(name, dry, inputs):
        if name == "step":
            return [sys.executable, "-c", "import time; time.sleep(60)"]
        return real(name, dry, inputs)

    monkeypatch.setattr(gpu_check, "part_argv", planted)
    limits = {name: 60 for name in gpu_check.ORDER} | {"step": 1}
    results = gpu_check.run_all(["environment", "step", "calibrate"], True, limits)
    step = results["step"]
    assert step["status"] == "timed_out" and step["seconds"] < 10
    assert "over its 1 s limit" in step["reason"]
    assert all(step[key] is None for key in gpu_check.FIGURES["step"])
    assert results["environment"]["status"] == "ok"
    assert results["calibrate"]["status"] == "skipped"  # ran after it


@pytest.mark.slow
def test_the_wheels_for_the_device_are_one_per_package_and_install(tmp_path):
    wheels = tmp_path / "whl312"
    subprocess.run(
        ["bash", "scripts/gpu_wheels.sh", "--dest", str(wheels)], cwd=REPO, check=True, timeout=600
    )
    script = (REPO / "scripts" / "gpu_wheels.sh").read_text()
    block = script.split("PACKAGES=(\n")[1].split("\n)\n")[0]
    packages = re.findall(r"([A-Za-z0-9_.-]+)==", block)
    wanted = {name.replace("-", "_").lower() for name in packages}
    found = sorted(wheels.glob("*.whl"))
    names = [w.name.split("-")[0].lower() for w in found]
    assert sorted(names) == sorted(wanted)  # one wheel for each package
    for wheel in found:
        tags = wheel.name[:-4].split("-")[-3:]  # python, abi, platform
        assert tags[2] == "any" or (
            tags[0] == "cp312" and "manylinux" in tags[2] and tags[2].endswith("x86_64")
        ), wheel.name
        assert zipfile.ZipFile(wheel).testzip() is None
    assert sum(w.stat().st_size for w in found) < 32 * 2**20
    here = tmp_path / "whl311"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run(
        ["bash", "scripts/gpu_wheels.sh", "--python-version", version, "--dest", str(here)],
        cwd=REPO,
        check=True,
        timeout=600,
    )
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
         str(target), *map(str, sorted(here.glob("*.whl")))],
        check=True,
        timeout=600,
    )  # fmt: skip
    probe = (
        "import webdataset, torchft, zstandard, sys; "
        f"assert webdataset.__file__.startswith({str(target)!r}), webdataset.__file__; "
        f"assert torchft.__file__.startswith({str(target)!r}), torchft.__file__"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    subprocess.run([sys.executable, "-c", probe], check=True, env=env, timeout=120)
