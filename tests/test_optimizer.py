"""Param groups and LR schedules."""

from __future__ import annotations

import pytest
import torch

from models.transformer import build_model
from pretrain.config import LRSchedulerConfig, OptimizerConfig
from pretrain.optimizer import Optimizers, clip_grad_norm, lr_factor
from pretrain.rowwise_adam import RowwiseAdam
from tests.test_models import tiny


def _groups(opts):
    return {g["name"]: g for g in opts.param_groups}


@pytest.mark.parametrize("sparse", [True, False])
def test_param_groups(sparse):
    args = tiny(hc=2)
    args.engram.sparse_grad = sparse
    model = build_model(args)
    opts = Optimizers(model, OptimizerConfig(lr=1e-3, weight_decay=0.1, engram_lr_multiplier=5.0))
    opts.set_lr(0.5)
    groups = _groups(opts)
    table = model.engram_layers()[0].table.weight
    tables = groups["engram_tables"]
    assert any(p is table for p in tables["params"])
    assert tables["lr"] == pytest.approx(1e-3 * 5 * 0.5) and tables.get("weight_decay", 0.0) == 0.0
    assert isinstance(opts.optimizers[-1], RowwiseAdam) == sparse
    no_decay = groups["no_decay"]["params"]
    assert any(p is model.tok_embeddings.weight for p in no_decay)
    assert any(p is model.norm.weight for p in no_decay)
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert not any(p is table for p in groups["decay"]["params"] + no_decay)


def test_cosine_schedule():
    cfg = LRSchedulerConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(5, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.55)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)


def test_wsd_schedule():
    cfg = LRSchedulerConfig(name="wsd", warmup_steps=10, decay_ratio=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, 100, cfg) == 1.0 and lr_factor(80, 100, cfg) == 1.0
    assert lr_factor(90, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0)


def test_clip_covers_sparse_and_dense():
    dense = torch.nn.Parameter(torch.zeros(3))
    dense.grad = torch.tensor([3.0, 0.0, 0.0])
    table = torch.nn.Embedding(10, 2, sparse=True)
    table(torch.tensor([1, 1])).sum().backward()  # rows [2, 2] after coalescing -> norm sqrt(8)
    norm = clip_grad_norm([dense, table.weight], max_norm=1.0)
    assert norm.item() == pytest.approx((9 + 8) ** 0.5)
    after = clip_grad_norm([dense, table.weight], max_norm=0)
    assert after.item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("scale", [10.0, 0.01])  # clipped, and left alone
def test_the_clip_is_float64_exact_to_float32_rounding_in_a_few_kernels(scale):
    """The global norm of many dense gradients and a sparse one equals a float64 sum over every
    element to float32 rounding; the clip scales each gradient by min(1, max / (norm + 1e-6)) of
    that norm; and the dense gradients take the same few multi-tensor kernels whether there are
    4 of them or 40."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    def setup(n):
        g = torch.Generator().manual_seed(n)
        params = [torch.nn.Parameter(torch.zeros(7, 5)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn(7, 5, generator=g) * scale
        table = torch.nn.Embedding(10, 3, sparse=True)
        (table(torch.tensor([1, 4, 4])) * scale).sum().backward()
        return [*params, table.weight]

    params = setup(40)
    before = [p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad.clone() for p in params]
    want = sum(g.double().square().sum() for g in before).sqrt().item()
    norm = clip_grad_norm(params, max_norm=1.0)
    assert norm.dtype == torch.float32
    assert norm.item() == pytest.approx(want, rel=1e-6)
    coef = min(1.0, 1.0 / (want + 1e-6))
    for p, grad in zip(params, before):
        got = p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad
        torch.testing.assert_close(got, grad * coef, rtol=1e-6, atol=0)
    counts = []
    for n in (4, 40):
        params = [p for p in setup(n) if not p.grad.is_sparse]
        with Ops() as ops:
            clip_grad_norm(params, max_norm=1.0)
        counts.append(sum(ops.count.values()))
    assert counts[0] == counts[1] <= 12, counts


def _fused_dtensor_matches_plain(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    plain = torch.nn.Linear(8, 6)
    sharded = torch.nn.Linear(8, 6)
    sharded.load_state_dict(plain.state_dict())
    mesh = init_device_mesh("cpu", (world,))
    for name, p in list(sharded.named_parameters()):
        setattr(sharded, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1)
    # the kernels CUDA gets: fused AdamW, DTensors included
    opts = [Optimizers(m, cfg, cuda=True) for m in (plain, sharded)]
    assert all(o.optimizers[0].defaults["fused"] for o in opts)
    for _ in range(3):
        for p, q in zip(plain.parameters(), sharded.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return [
        (p.detach() - q.full_tensor()).abs().max().item()
        for p, q in zip(plain.parameters(), sharded.parameters())
    ]


def test_fused_adamw_on_dtensors_matches_plain_tensors():
    from tests.distributed.helpers import run_ranks

    for diffs in run_ranks(_fused_dtensor_matches_plain, 2).values():
        assert max(diffs) < 1e-6, diffs
