"""Engram module beyond the reference cases: V4.1 variant, conv init, row-wise Adam."""

from __future__ import annotations

import math

import pytest
import torch

from models.engram import Engram, EngramConfig
from pretrain.rowwise_adam import RowwiseAdam


def _cfg(**kw):
    base = dict(
        layer_ids=[0],
        engram_vocab_size=[101, 103],
        max_ngram_size=3,
        n_embed_per_ngram=16,
        n_head_per_ngram=2,
        kernel_size=3,
    )
    return EngramConfig(**{**base, **kw})


def _module(cfg, dim=24, hc=2):
    torch.manual_seed(0)
    module = Engram(cfg, 0, dim, hc, cfg.table_sizes()[0])
    module.init_weights()
    return module


def test_v41_variant_matches_direct_formula():
    cfg = _cfg(variant="v4.1")
    module = _module(cfg)
    assert not hasattr(module, "short_conv") and module.kv_proj.bias is None
    hidden = torch.randn(2, 5, 2, 24)
    ids = torch.randint(0, 100, (2, 5, 4))
    out = module(hidden, ids)
    rows = module.table(ids).flatten(-2)
    kv = rows @ module.kv_proj.weight.T
    keys, value = kv[..., :48].reshape(2, 5, 2, 24), kv[..., 48:]
    expected = []
    for i in range(2):
        k = torch.nn.functional.rms_norm(keys[:, :, i], (24,), module.key_norms[i].weight)
        q = torch.nn.functional.rms_norm(hidden[:, :, i], (24,), module.query_norms[i].weight)
        g = (k * q).sum(-1) / math.sqrt(24)
        g = torch.sigmoid(g.abs().clamp_min(1e-6).sqrt() * g.sign())
        expected.append(g.unsqueeze(-1) * value)
    torch.testing.assert_close(out, torch.stack(expected, 2))


def test_v41_gate_in_float32():
    module = _module(_cfg(variant="v4.1"))
    hidden, ids = torch.randn(1, 3, 2, 24), torch.randint(0, 100, (1, 3, 4))
    module.combine(hidden, module.table(ids).flatten(-2))
    fp32_gate = module.last_gate_mean.item()
    module = module.to(torch.bfloat16)
    module.combine(hidden.bfloat16(), module.table(ids).flatten(-2))
    assert module.last_gate_mean.dtype == torch.float32
    # a bf16 model's gate is computed from bf16 inputs but in float32 arithmetic
    assert abs(module.last_gate_mean.item() - fp32_gate) < 2e-2


def test_zero_conv_init_is_pure_gated_lookup():
    module = _module(_cfg(conv_init="zero"))
    assert module.short_conv.conv.weight.abs().sum() == 0
    ref_module = _module(_cfg(conv_init="reference"))
    assert ref_module.short_conv.conv.weight.abs().sum() > 0


def test_bad_config_names_field():
    with pytest.raises(ValueError, match="engram.layer_ids"):
        _cfg(layer_ids=[5]).validate(num_layers=4)
    with pytest.raises(ValueError, match="n_embed_per_ngram"):
        _cfg(n_embed_per_ngram=15).validate()
    with pytest.raises(ValueError, match="engram.variant"):
        _cfg(variant="v5").validate()


def _train_table(sparse: bool, optimizer_cls, steps=4):
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 6, sparse=sparse)
    opt = optimizer_cls(table.parameters(), lr=0.1)
    for step in range(steps):
        ids = torch.randint(
            0, 50 if step else 10, (7, 3), generator=torch.Generator().manual_seed(step)
        )
        opt.zero_grad()
        (table(ids) ** 2).sum().backward()
        opt.step()
    return table.weight.detach()


def test_rowwise_adam_equals_sparse_adam():
    ours = _train_table(True, lambda p, lr: RowwiseAdam(p, lr=lr, betas=(0.9, 0.999)))
    theirs = _train_table(True, lambda p, lr: torch.optim.SparseAdam(list(p), lr=lr))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_rowwise_adam_dense_grad_equals_sparse_grad():
    sparse = _train_table(True, lambda p, lr: RowwiseAdam(p, lr=lr))
    dense = _train_table(False, lambda p, lr: RowwiseAdam(p, lr=lr))
    torch.testing.assert_close(sparse, dense)


def test_rowwise_adam_leaves_untouched_rows():
    table = torch.nn.Embedding(20, 4, sparse=True)
    before = table.weight.detach().clone()
    opt = RowwiseAdam(table.parameters(), lr=0.1)
    table(torch.tensor([3, 5, 5])).sum().backward()
    opt.step()
    changed = (table.weight.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 5]
