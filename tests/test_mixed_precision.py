"""bf16 mixed precision: every matmul of a training step (forward and backward, experts included)
runs on bf16 operands under autocast, also when the experts receive float32 activations, which is
what CUDA autocast hands them (it keeps ``rms_norm`` in float32; CPU autocast does not, so the
expert test feeds float32 explicitly). The same check on a real GPU is
``tests/test_gpu.py::test_gpu_bf16_matmuls``."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from data.batch import plan_lookups
from models.args import MoEArgs
from models.moe import MoE
from parallel.plan import ParallelPlan
from pretrain.step import StepModel, forward_backward, lookup_planners
from tests.distributed.parity import initial_model, make_batch, model_args

aten = torch.ops.aten
MATMULS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten._grouped_mm.default,
    aten.convolution.default,
    aten.convolution_backward.default,
}


class MatmulDtypes:
    """Operand dtypes of every matmul-like aten op, and of every attention call (whose CPU math
    kernel upcasts internally, so its inner ops are not counted)."""

    def __init__(self):
        self.seen: Counter = Counter()
        outer = self

        class Attention(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is F.scaled_dot_product_attention:
                    outer.seen[("sdpa", tuple(str(a.dtype) for a in args[:3]))] += 1
                    outer.inside_attention += 1
                    try:
                        return func(*args, **(kwargs or {}))
                    finally:
                        outer.inside_attention -= 1
                return func(*args, **(kwargs or {}))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in MATMULS and not outer.inside_attention:
                    dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
                    outer.seen[(str(func), dtypes)] += 1
                return func(*args, **(kwargs or {}))

        self.inside_attention = 0
        self._modes = [Attention(), Ops()]

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def not_bf16(self) -> dict:
        """Ops with a floating operand that is not bf16 (integer offsets are fine)."""
        return {
            op: n
            for op, n in self.seen.items()
            if any("float" in d and d != "torch.bfloat16" for d in op[1])
        }


def test_autocast_bf16_matmuls_in_a_training_step():
    args = model_args(sparse=True, attention="gqa")
    args.dim, args.moe.expert_hidden_dim = 64, 32  # 16-byte aligned: the grouped_mm path
    # GQA, causal only: CPU's fused bf16 attention kernel. A dense document mask or MLA's unequal
    # head dims take CPU's math kernel, which upcasts to float32 inside, also in its backward (on
    # GPUs attention runs fused in bf16 either way: tests/test_gpu.py)
    args.document_mask = False
    model = initial_model(args)
    sm = StepModel(model, model, ParallelPlan(), mixed_precision="bf16")
    with MatmulDtypes() as rec:
        forward_backward(sm, make_batch(0))
    assert not rec.not_bf16(), rec.not_bf16()
    ops = {op for op, _ in rec.seen}
    assert {"aten._grouped_mm.default", "aten.mm.default", "sdpa"} <= ops, ops


def test_autocast_experts_bf16_on_float32_input():
    torch.manual_seed(0)
    moe = MoE(64, MoEArgs(num_routed_experts=4, top_k=2, expert_hidden_dim=32))
    moe.init_weights(0.02, 0.02)
    x = torch.randn(2, 8, 64, requires_grad=True)  # float32, as CUDA autocast's rms_norm gives
    want, _ = moe(x)
    for grouped in (True, False):
        moe.experts.use_grouped_mm = grouped
        with MatmulDtypes() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = moe(x)
            out.float().square().sum().backward()
        assert not rec.not_bf16(), (grouped, rec.not_bf16())
        torch.testing.assert_close(out.float(), want, rtol=0.05, atol=2e-3)


def _fsdp_bf16_rank(rank: int, world: int, args, ckpt: str):
    from models.parallelize import parallelize_deepseek_engram
    from models.transformer import Transformer
    from parallel.dims import ParallelDims
    from pretrain.config import ParallelismConfig
    from tests.distributed.parity import load_initial

    dims = ParallelDims.from_config(ParallelismConfig(engram_shard_degree=2), world)
    with torch.device("meta"):
        model = Transformer(args)
    model, inner, plan = parallelize_deepseek_engram(
        model, dims, dims.build_mesh("cpu"), "cpu", 0, mixed_precision="bf16"
    )
    load_initial(inner, ckpt)
    sm = StepModel(model, inner, plan, mixed_precision="bf16")
    with MatmulDtypes() as rec:
        batch = make_batch(0).select_rows(slice(2 * rank, 2 * rank + 2))
        out = forward_backward(sm, plan_lookups(batch, lookup_planners(inner)))
    grad_dtypes = {str(p.grad.dtype) for p in inner.parameters() if p.grad is not None}
    param_dtypes = {str(p.dtype) for p in inner.parameters()}
    return rec.not_bf16(), out.ce.item(), grad_dtypes, param_dtypes


@pytest.mark.distributed
def test_fsdp_bf16_mixed_precision(tmp_path):
    """FSDP2 gathers parameters in bf16, keeps the shards and reduced gradients in float32; the
    loss matches the single-process bf16 autocast step to bf16 rounding."""
    from tests.distributed.helpers import run_ranks
    from tests.distributed.parity import save_initial

    args = model_args(sparse=True, attention="gqa")
    args.document_mask = False  # see test_autocast_bf16_matmuls_in_a_training_step
    ckpt = save_initial(args, tmp_path / "init")
    model = initial_model(args)
    sm = StepModel(model, model, ParallelPlan(), mixed_precision="bf16")
    want = forward_backward(sm, make_batch(0)).ce.item()
    results = run_ranks(_fsdp_bf16_rank, 2, args, ckpt)
    mean = sum(r[1] for r in results.values()) / 2
    assert mean == pytest.approx(want, rel=1e-2)
    for not_bf16, _, grad_dtypes, param_dtypes in results.values():
        assert not not_bf16, not_bf16
        assert grad_dtypes == {"torch.float32"} and param_dtypes == {"torch.float32"}
