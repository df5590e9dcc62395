"""FP8 jobs end to end on CPU (emulated): the checkpoint holds the high-precision weights that
every tool reads, switching FP8 on or off between runs resumes with a warning, and FP8 trains to
the BF16 loss (the 300-step curve is docs/benchmarks.md's, from benchmarks/fp8.py)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pretrain.checkpoint_reader import load_model
from tests.test_trainer import _records, _trainer

pytest.importorskip("torchao")

FP8 = ["--quantize.linear.float8.enable=true", "--quantize.engram=true"]


def _metadata(folder):
    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {
        key: (value.properties.dtype, tuple(value.size))
        for key, value in meta.items()
        if hasattr(value, "size")
    }


def test_fp8_checkpoint_holds_the_high_precision_weights_and_a_switch_warns(
    corpus, tmp_path, caplog
):
    fp8 = _trainer(corpus, tmp_path / "fp8", steps=4, extra=FP8)
    fp8.fit()
    converted = [n for n, m in fp8.model.named_modules() if type(m).__name__ == "Float8Linear"]
    assert converted  # it trained in FP8
    plain = _trainer(corpus, tmp_path / "plain", steps=4)
    plain.fit()
    saved = tmp_path / "fp8" / "checkpoints" / "step-00000004"
    # the same tensors, names, dtypes (float32) and shapes as a high-precision run's checkpoint
    assert _metadata(saved) == _metadata(tmp_path / "plain" / "checkpoints" / "step-00000004")

    # the tools' reader (evaluate, generate, convert) gets the weights the FP8 run trained
    model, _, _ = load_model(saved)
    trained = fp8.model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name

    # FP8 off on the same folder: resumes at step 4 with a warning, and trains on
    with caplog.at_level(logging.WARNING):
        resumed = _trainer(corpus, tmp_path / "fp8", steps=6)
    assert resumed.step == 4
    assert "trained with FP8 rowwise (linears, engram) and this job trains with FP8 none" in (
        caplog.text
    )
    resumed.fit()
    assert sorted(_records(tmp_path / "fp8"))[-2:] == [5, 6]


@pytest.mark.slow
def test_fp8_trains_to_the_bf16_loss(corpus, tmp_path):
    """300 steps of the debug Engram-MoE flavor, FP8 (linears and Engram GEMM, rowwise,
    emulated) against BF16 autocast: the held-out loss and the last 50 steps' mean training loss
    within 2 %."""
    from benchmarks.fp8 import loss_curves, window_means

    curves = loss_curves(corpus, tmp_path, steps=300, batch=2)
    bf16, fp8 = curves["bf16"], curves["fp8"]
    assert abs(fp8["val_loss"] / bf16["val_loss"] - 1) < 0.02
    last = [window_means(arm["losses"], 50)[300] for arm in (bf16, fp8)]
    assert abs(last[1] / last[0] - 1) < 0.02
    assert bf16["losses"][300] < bf16["losses"][1] - 1  # both learned
    assert fp8["losses"][1] != bf16["losses"][1]  # and FP8 computed otherwise from the start
