"""Experiment arms (models/derive.py), the sweep driver (launch/experiments.py) and the analysis
tools (pretrain/analyze.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.derive import check, derive
from models.flavors import get_flavor
from models.transformer import build_model
from pretrain.inference import analyze


@pytest.mark.parametrize("size", ["s", "m"])
@pytest.mark.parametrize("vocab", [1000, 16000])
def test_derived_arms_are_iso_parameter_and_iso_flop(size, vocab):
    for experiment in ("iso_flop", "allocation"):
        arms = derive(experiment, size, vocab, 256)
        check(experiment, arms, vocab, 256)  # raises beyond 1%
        ref = arms[0].accounting(vocab, 256)
        for arm in arms[1:]:
            acc = arm.accounting(vocab, 256)
            assert abs(acc.total_params / ref.total_params - 1) < 0.01
            assert abs(acc.flops_per_token / ref.flops_per_token - 1) < 0.01
            assert abs(acc.activated_params / ref.activated_params - 1) < 0.01
            assert acc.engram_table_params > 0
    allocation = derive("allocation", size, vocab, 256)
    rhos = [a.rho for a in allocation]
    assert len(rhos) >= 5 and rhos[0] == 1.0 and rhos == sorted(rhos, reverse=True)
    memory = derive("memory_scaling", size, vocab, 256)
    rows = [a.table_rows for a in memory]
    assert len(rows) >= 4 and rows[-1] / rows[0] >= 29
    flops = {a.accounting(vocab, 256).flops_per_token for a in memory}
    assert len(flops) == 1  # the backbone is fixed


@pytest.mark.slow  # CLI end to end
def test_sweep_driver_runs_and_resumes(corpus, tmp_path):
    from launch.experiments import main

    argv = [
        "iso_flop",
        f"--corpus={corpus}",
        f"--out={tmp_path / 'sweep'}",
        "--steps=3",
        "--seeds=0",
        "--seq_len=64",
        "--batch_size=2",
        "--eval_batches=1",
    ]
    assert main(argv) == 0
    res = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert res["experiment"] == "iso_flop"
    assert [a["name"] for a in res["arms"]] == ["moe", "engram"]
    for arm in res["arms"]:
        for key in ("total_params", "activated_params", "engram_params", "flops_per_token"):
            assert isinstance(arm[key], int) and arm[key] >= 0
        assert "table_rows" in arm and arm["tokens"] == 3 * 2 * 64
        assert len(arm["val_loss"]) == 1 and np.isfinite(arm["val_loss"][0])
    assert (tmp_path / "sweep" / "report.md").is_file()
    # a finished sweep is not trained again
    before = (tmp_path / "sweep" / "runs" / "moe" / "seed0" / "result.json").stat().st_mtime
    assert main(argv) == 0
    after = (tmp_path / "sweep" / "runs" / "moe" / "seed0" / "result.json").stat().st_mtime
    assert before == after
    assert json.loads((tmp_path / "sweep" / "results.json").read_text())["arms"] == res["arms"]


def _model_and_windows(seed=0):
    args = get_flavor("debug")
    torch.manual_seed(seed)
    model = build_model(args, seed=seed).eval()
    ids = np.random.default_rng(seed).integers(0, 1000, size=200)
    return model, analyze.windows(ids, 48, 3)


class _RandomHasher:
    """Hash ids of the right shape without a tokenizer."""

    def __init__(self, args):
        self.args = args

    def hash(self, window):
        e = self.args.engram
        rng = np.random.default_rng(int(window.sum()))
        sizes = e.table_sizes()
        return {
            layer: rng.integers(0, min(sizes[layer]), size=(*window.shape, e.num_heads))
            for layer in e.layer_ids
        }


def test_cka_of_a_model_with_itself_is_one_on_the_diagonal():
    model, wins = _model_and_windows()
    hasher = _RandomHasher(model.args)
    feats = analyze.layer_features(model, hasher, wins)
    matrix = analyze.cka_matrix(feats, feats)
    for i in range(len(feats)):
        assert matrix[i][i] == pytest.approx(1.0, abs=1e-9)
    x = torch.randn(50, 8)
    assert analyze.linear_cka(x, x @ torch.linalg.qr(torch.randn(8, 8))[0]) == pytest.approx(1.0)


def test_logit_lens_of_the_last_block_is_zero():
    model, wins = _model_and_windows()
    kls = analyze.logit_lens(model, _RandomHasher(model.args), wins)
    assert len(kls) == model.args.num_layers
    assert kls[-1] == pytest.approx(0.0, abs=1e-6) and kls[0] > 0


def test_engram_ablation_equals_the_model_without_engram():
    model, wins = _model_and_windows()
    hasher = _RandomHasher(model.args)
    window = wins[0]
    with torch.no_grad(), analyze.engram_ablated(model):
        ablated = analyze.forward_window(model, hasher, window).logits
    for layer in model.layers.values():
        layer.engram = None
    with torch.no_grad():
        without = model(torch.from_numpy(window[:-1]).unsqueeze(0)).logits
    assert torch.equal(ablated, without)


def test_gate_values_cover_every_token_and_branch():
    model, wins = _model_and_windows()
    gates = analyze.gate_values(model, _RandomHasher(model.args), wins[0])
    assert set(gates) == set(model.args.engram.layer_ids)
    for values in gates.values():
        assert values.shape == (wins[0].size - 1, model.args.hc_mult)
        assert ((values > 0) & (values < 1)).all()
    page = analyze.gate_html([f"t{i}" for i in range(wins[0].size - 1)], gates)
    assert page.count("<span") == len(gates) * (wins[0].size - 1)


def test_iso_flop_verdict_pairs_seeds():
    from launch.experiments import iso_flop_verdict

    rows = [{"val_loss": [5.5, 6.0, 6.3]}, {"val_loss": [5.4, 5.91, 6.19]}]
    unpaired, paired = iso_flop_verdict(rows)
    assert "does not clearly beat" in unpaired  # the data order's spread hides the difference
    assert "Paired by seed: Engram beats" in paired and "+0.1000" in paired
    rows[1]["val_loss"] = [5.6, 5.9, 6.35]
    assert "does not clearly beat" in iso_flop_verdict(rows)[1]


def test_short_labels_keep_what_differs():
    paths = ["out/iso/runs/engram/seed0/checkpoints", "out/iso/runs/moe/seed0/checkpoints"]
    assert analyze.short_labels(paths) == ["engram", "moe"]
    assert analyze.short_labels(["a/b"]) == ["b"]
