"""Numerics checked against expectations written out by hand, not computed by the code under test:
FP8 (E4M3 values, E8M0 block scales) and YaRN's attention scale."""

from __future__ import annotations

import math

import pytest
import torch

from models.args import ModelArgs, YarnArgs
from models.attention import GQAttention, MLAttention
from models.hf import fp8


@pytest.mark.parametrize(
    "amax, scale",
    [
        (448.0, 1.0),  # exactly E4M3's largest value at scale 1
        (449.0, 2.0),  # just over: the next power of two
        (896.0, 2.0),
        (897.0, 4.0),
        (1.0, 2.0**-8),  # 1 / 2**-9 = 512 > 448; 1 / 2**-8 = 256 fits
        (3.5, 2.0**-7),  # 3.5 / 448 = 2**-7 exactly
        (0.001, 2.0**-18),  # 0.001 / 2**-19 = 524.3 > 448; / 2**-18 = 262.1 fits
    ],
)
def test_fp8_scale_is_the_smallest_power_of_two_that_fits_the_block(amax, scale):
    row = torch.zeros(2, 40)
    row[0, 5] = -amax  # the sign does not matter; the other values are smaller
    row[0, 7] = amax / 3
    row[1, 35] = amax  # the second block of the second row
    _, scales = fp8.quantize_rows(row)
    assert scales.shape == (2, 2)
    assert scales[0, 0].float().item() == scale
    assert scales[1, 1].float().item() == scale
    block = torch.zeros(40, 40)
    block[31, 0] = amax  # inside the first 32 x 32 block
    block[32, 33] = amax / 2**10  # alone in the last block
    _, block_scales = fp8.quantize_blocks(block)
    assert block_scales.shape == (2, 2)
    assert block_scales[0, 0].float().item() == scale
    assert block_scales[1, 1].float().item() == scale / 2**10


def test_fp8_every_scale_is_minimal_on_random_rows():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.arange(
        -3, 3
    ).repeat_interleave(16)[:64].unsqueeze(1)
    q, scales = fp8.quantize_rows(x)
    amax = x.abs().unflatten(1, (-1, 32)).amax(dim=-1)
    s = scales.float()
    assert (amax / s <= 448).all()  # fits
    assert (amax / (s / 2) > 448).all()  # half of it would not
    assert (q.float().abs() <= 448).all()


def _yarn_args(attention: str) -> ModelArgs:
    return ModelArgs(
        vocab_size=64,
        dim=32,
        num_layers=1,
        num_heads=1,
        attention=attention,
        num_kv_heads=1,
        head_dim=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_seq_len=64,
        yarn=YarnArgs(
            factor=40.0,
            original_max_position_embeddings=16,
            mscale=1.0,
            mscale_all_dim=0.707,
        ),
    )


def test_yarn_mscale_scales_the_attention_logits():
    """YaRN (Peng et al. 2023; DeepSeek-V3): softmax scale = d**-0.5 * (0.1 * m * ln(s) + 1)**2,
    with m = mscale_all_dim for MLA (mscale for GQA), s = 40: written out here."""
    mla_expected = (16 + 8) ** -0.5 * (0.1 * 0.707 * math.log(40.0) + 1.0) ** 2
    gqa_expected = 32**-0.5 * (0.1 * 1.0 * math.log(40.0) + 1.0) ** 2
    assert MLAttention(_yarn_args("mla")).scale == pytest.approx(mla_expected, rel=1e-12)
    gqa = GQAttention(_yarn_args("gqa"))
    assert gqa.scale == pytest.approx(gqa_expected, rel=1e-12)
    # and the forward uses it: identity projections, rotation by 0 (q = k = v = x)
    with torch.no_grad():
        for linear in (gqa.wq, gqa.wk, gqa.wv, gqa.wo):
            linear.weight.copy_(torch.eye(32))
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1))
    rope = (torch.ones(1, 6, 1, 32), torch.zeros(1, 6, 1, 32))  # the identity rotation
    with torch.no_grad():
        out = gqa(x, rope, None)
    scores = (x[0] @ x[0].T) * gqa_expected
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = scores.softmax(dim=-1) @ x[0]
    assert torch.allclose(out[0], expected, atol=1e-5)
