"""Checks that need a CUDA device (marked ``gpu``; CI has none, they are skipped there). Run on a
GPU machine with ``python -m pytest -m gpu tests/test_gpu.py``; results are in docs/benchmarks.md.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from data.batch import plan_lookups
from parallel.plan import ParallelPlan
from pretrain.config import OptimizerConfig
from pretrain.optimizer import Optimizers
from pretrain.step import StepModel, forward_backward, optimizer_step
from tests.distributed.parity import initial_model, make_batch, model_args
from tests.test_mixed_precision import MatmulDtypes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _gpu_model(attention: str, backend: str, dim: int = 64):
    args = model_args(sparse=True, attention=attention)
    args.dim, args.moe.expert_hidden_dim = dim, 32  # 16-byte aligned: grouped_mm
    # head dims the fused kernels take (flex needs >= 16; MLA's q/k and v dims differ)
    args.head_dim, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim = 16, 32, 16, 32
    args.attention_backend = backend
    model = initial_model(args).cuda()
    return model, StepModel(model, model, ParallelPlan(), mixed_precision="bf16")


def _batch():
    return plan_lookups(make_batch(0), {}).to(torch.device("cuda"))


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_gpu_bf16_matmuls(attention):
    """CUDA autocast keeps rms_norm in float32: the experts must still run bf16."""
    _, sm = _gpu_model(attention, "sdpa")
    with MatmulDtypes() as rec:
        forward_backward(sm, _batch())
    assert not rec.not_bf16(), rec.not_bf16()
    assert any(op == "aten._grouped_mm.default" for op, _ in rec.seen)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_gpu_forward_backward_without_host_sync(backend):
    """``torch.cuda.set_sync_debug_mode("error")`` over a forward and backward: nothing waits."""
    _, sm = _gpu_model("mla", backend)
    batch = _batch()
    forward_backward(sm, batch)  # warm-up: compilation and caches may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(sm, batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_gpu_optimizer_step_syncs():
    """The documented budget of the optimizer step: the global norm's one device-to-host copy
    (clipping), plus what the row-wise table optimizer's sparse coalesce needs."""
    model, sm = _gpu_model("mla", "sdpa")
    opts = Optimizers(model, OptimizerConfig(lr=1e-3))
    forward_backward(sm, _batch())
    optimizer_step(sm, opts, 1.0)  # warm-up: optimizer state allocation
    forward_backward(sm, _batch())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer_step(sm, opts, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    tables = len(model.engram_layers())
    print(f"optimizer step syncs: {len(syncs)} ({tables} tables)")
    assert len(syncs) <= 1 + 2 * tables, [str(w.message)[:200] for w in syncs]


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_gpu_flex_attention_matches_sdpa(attention):
    """Compiled flex_attention block masks against SDPA's dense mask: outputs and gradients."""
    grads = {}
    for backend in ("sdpa", "flex"):
        model, sm = _gpu_model(attention, backend)
        sm.mixed_precision = "none"  # float32: compare to rounding
        out = forward_backward(sm, _batch())
        grads[backend] = (out.ce, {n: p.grad.to_dense() for n, p in model.named_parameters()})
    (ce_a, ga), (ce_b, gb) = grads["sdpa"], grads["flex"]
    torch.testing.assert_close(ce_b, ce_a, rtol=1e-4, atol=1e-5)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-3, atol=1e-5, msg=name)


def test_gpu_pinned_batches_with_shard_plans():
    """What the loader does with ``pin_memory=True`` on CUDA: every tensor of a batch and of its
    lookup plans is page-locked (the plan's split counts stay ordinary host memory)."""
    from parallel.engram_table_parallel import ShardPlanner, row_bounds

    planner = ShardPlanner(torch.zeros(4, dtype=torch.int64).numpy(), row_bounds(50, 2))
    batch = plan_lookups(make_batch(0), {0: planner}).pin_memory()
    pinned = [batch.tokens, batch.labels, batch.positions, batch.doc_ids]
    plan = batch.engram[0].plan
    pinned += [batch.engram[0].hash_ids, plan.unique_ids, plan.inverse]
    assert all(t.is_pinned() for t in pinned)
    moved = batch.to(torch.device("cuda"))
    assert moved.engram[0].plan.unique_ids.is_cuda and not moved.engram[0].plan.send_counts.is_cuda


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_gpu_offloaded_table_is_bit_identical_to_device(tmp_path, placement):
    """The CUDA path of offloaded tables: a page-locked host store (or a memory-mapped file),
    rows copied on a side stream the compute stream waits for, prefetch threads; 10 steps are
    bit-identical to the CUDA device table."""
    from tests.test_engram_offload import build, run

    want_sm, want_opts = build("device", tmp_path, device="cuda")
    want = run(want_sm, want_opts, range(10), prefetch=False, device="cuda")
    sm, opts = build(placement, tmp_path, device="cuda")
    table = sm.inner.engram_layers()[0].table
    assert table.cache._copy_stream is not None and table.cache.records.is_cuda
    assert table.store.records.is_pinned() == (placement == "host")
    assert run(sm, opts, range(10), prefetch=True, device="cuda") == want
    table.cache.flush()
    want_rows = want_sm.inner.engram_layers()[0].table.weight.detach().cpu()
    assert torch.equal(table.store.field("weight"), want_rows)


def test_gpu_experiment_sweep_on_cuda(corpus, tmp_path):
    """``launch.experiments --device cuda``: the arms train on the GPU in bf16 (flex attention)
    with paired verdicts, and the fused row-wise update runs on CUDA."""
    import json

    from launch.experiments import main

    argv = [
        "iso_flop",
        f"--corpus={corpus}",
        f"--out={tmp_path}",
        "--size=xs",
        "--steps=4",
        "--seeds=0",
        "--seq_len=64",
        "--batch_size=2",
        "--eval_batches=2",
        "--device=cuda",
    ]
    assert main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    config = (tmp_path / "runs" / "engram" / "seed0" / "config.toml").read_text()
    assert 'device = "cuda"' in config and 'mixed_precision = "bf16"' in config
    assert all(len(arm["val_windows"][0]) == 2 for arm in res["arms"])


# ----- FP8 ([quantize], models/quantize.py): the kernels an H100 runs ----------------------


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops dispatched below the float8 tensor subclasses."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _fp8_section(recipe="rowwise", experts=False, engram=False, all_gather=False):
    from pretrain.config import QuantizeConfig

    section = QuantizeConfig(engram=engram)
    section.linear.float8.enable = True
    section.linear.float8.recipe_name = recipe
    section.linear.float8.enable_fsdp_float8_all_gather = all_gather
    section.linear.float8.precompute_float8_dynamic_scale_for_fsdp = all_gather
    section.grouped_mm.enable = experts
    return section


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs FP8 tensor cores (compute capability 8.9+)",
)
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_gpu_fp8_step_runs_scaled_gemms_and_tracks_bf16(recipe):
    """The converted model (linears, Engram GEMM, routed experts) runs ``_scaled_mm`` and the
    scaled grouped GEMM, not emulation; its loss is within 5 % of BF16's on the same batch; the
    router's loads count tokens, not the padding of the expert groups."""
    from models.quantize import build_quantize_converter

    pytest.importorskip("torchao")
    args = model_args(sparse=True, attention="gqa")
    args.dim, args.moe.expert_hidden_dim, args.ffn_hidden_dim = 64, 32, 128
    losses, loads = [], []
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = initial_model(args)
        if fp8:
            converter = build_quantize_converter(_fp8_section(recipe, experts=True, engram=True))
            assert not converter.emulate
            converter.convert(model)
        model = model.cuda()
        sm = StepModel(model, model, ParallelPlan(), mixed_precision="bf16")
        with _Ops() as ops:
            out = forward_backward(sm, _batch())
        losses.append(out.ce.item())
        loads.append([m.router.tokens_per_expert.clone() for m in model.moe_layers()])
        if fp8:
            assert "_scaled_mm" in ops.names, sorted(ops.names)
            assert any("scaled_grouped_mm" in name for name in ops.names), sorted(ops.names)
    assert abs(losses[1] / losses[0] - 1) < 0.05, losses
    for bf16, fp8 in zip(*loads):
        assert torch.equal(bf16, fp8)  # the same routing on the same batch, no padding counted


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs FP8 tensor cores (compute capability 8.9+)",
)
def test_gpu_fsdp_float8_all_gather_trains(tmp_path):
    """Tensorwise FP8 with FSDP2's float8 all-gather (NCCL, one rank) and the precomputed
    scales after each optimizer step: three steps train, and the sharded weights are torchao's
    float8-aware tensors."""
    import torch.distributed as dist

    from models.parallelize import parallelize_deepseek_engram
    from models.quantize import build_quantize_converter
    from models.transformer import Transformer
    from parallel.dims import ParallelDims
    from pretrain.config import ParallelismConfig

    pytest.importorskip("torchao")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        args = model_args(sparse=False, attention="gqa")
        args.dim, args.moe.expert_hidden_dim = 64, 32
        converter = build_quantize_converter(_fp8_section("tensorwise", all_gather=True))
        with torch.device("meta"):
            model = Transformer(args)
        converter.convert(model)
        dims = ParallelDims.from_config(ParallelismConfig(data_parallel_shard_degree=1), 1)
        model, inner, plan = parallelize_deepseek_engram(
            model, dims, dims.build_mesh("cuda"), "cuda", 0, mixed_precision="bf16"
        )
        wrapped = [
            p
            for p in inner.parameters()
            if "Float8" in type(getattr(p, "_local_tensor", p)).__name__
        ]
        assert wrapped, "no weight is float8-aware for the all-gather"
        sm = StepModel(model, inner, plan, mixed_precision="bf16")
        optimizers = Optimizers(model, OptimizerConfig(lr=1e-3))
        losses = []
        for _ in range(3):
            losses.append(forward_backward(sm, _batch()).ce.item())
            optimizer_step(sm, optimizers, 1.0)
            converter.post_optimizer_hook(model)
        assert all(torch.isfinite(torch.tensor(losses)))
    finally:
        dist.destroy_process_group()
