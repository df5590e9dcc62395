"""DDP, FSDP2 and HSDP (2 replicas x 2 shards) against the single-process run through the real
step (``tests.distributed.parity``): losses, global gradient norms and gradients at every step, and
the final parameters, on every rank.

The gloo ranks split each batch; the single-process reference takes the whole batch.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.parity import check_parity, model_args, reference, run_layout, save_initial

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    "world, layout, sparse",
    [
        (2, dict(data_parallel_replicate_degree=2), True),  # DDP + sparse replicated tables
        (2, dict(), False),  # FSDP2 (shard degree -1: the whole world)
        (4, dict(data_parallel_replicate_degree=2), False),  # HSDP
    ],
    ids=["ddp", "fsdp", "hsdp"],
)
def test_data_parallel_matches_single_process(world, layout, sparse, tmp_path):
    from tests.distributed.helpers import run_ranks

    args = model_args(sparse)
    ckpt = save_initial(args, tmp_path / "init")
    check_parity(reference(args), run_ranks(run_layout, world, layout, args, ckpt))


@pytest.mark.parametrize(
    "layout",
    [dict(), pytest.param(dict(engram_shard_degree=2), marks=pytest.mark.slow)],
    ids=["fsdp", "tables"],
)
def test_fsdp_grad_accumulation_matches_single_process(layout, tmp_path):
    """Two microbatches per step: the first neither reduce-scatters nor reshards after backward
    (``set_requires_gradient_sync``), the second does; the result is the whole batch's step."""
    from tests.distributed.helpers import run_ranks

    args = model_args(sparse=True) if layout else model_args(sparse=False)
    ckpt = save_initial(args, tmp_path / "init")
    check_parity(reference(args), run_ranks(run_layout, 2, layout, args, ckpt, 2))


def _deferred_rank(rank: int, world: int, args, ckpt: str):
    from models.parallelize import parallelize_deepseek_engram
    from models.transformer import Transformer
    from parallel.dims import ParallelDims
    from pretrain.config import ParallelismConfig
    from pretrain.step import StepModel, forward_backward
    from tests.distributed.parity import load_initial, make_batch

    dims = ParallelDims.from_config(ParallelismConfig(), world)
    with torch.device("meta"):
        model = Transformer(args)
    model, inner, plan = parallelize_deepseek_engram(model, dims, dims.build_mesh("cpu"), "cpu", 0)
    load_initial(inner, ckpt)
    sm = StepModel(model, inner, plan)
    batch = make_batch(0).select_rows(slice(2 * rank, 2 * rank + 1))

    def reduced() -> list[str]:  # FSDP's reduce-scatter leaves sharded DTensor gradients
        return [n for n, p in inner.named_parameters() if hasattr(p.grad, "placements")]

    forward_backward(sm, batch, scale=0.5, sync=False)
    deferred = reduced()
    unsharded = all(p.grad is not None and p.grad.shape == p.shape for p in inner.parameters())
    forward_backward(sm, batch, scale=0.5, sync=True)
    return deferred, unsharded, len(reduced()), len(list(inner.parameters()))


def test_fsdp_defers_the_reduce_scatter_to_the_last_microbatch(tmp_path):
    from tests.distributed.helpers import run_ranks

    args = model_args(sparse=False)
    ckpt = save_initial(args, tmp_path / "init")
    for deferred, unsharded, reduced, total in run_ranks(_deferred_rank, 2, args, ckpt).values():
        assert deferred == [] and unsharded and reduced == total


def _norm_reductions_rank(rank: int, world: int, args, ckpt: str):
    from unittest import mock

    import torch.distributed as dist

    from models.parallelize import parallelize_deepseek_engram
    from models.transformer import Transformer
    from parallel.dims import ParallelDims
    from pretrain.config import ParallelismConfig
    from pretrain.optimizer import clip_grad_norm
    from pretrain.step import StepModel, forward_backward
    from tests.distributed.parity import load_initial, make_batch

    dims = ParallelDims.from_config(ParallelismConfig(data_parallel_replicate_degree=2), world)
    with torch.device("meta"):
        model = Transformer(args)
    model, inner, plan = parallelize_deepseek_engram(model, dims, dims.build_mesh("cpu"), "cpu", 0)
    load_initial(inner, ckpt)
    forward_backward(
        StepModel(model, inner, plan), make_batch(0).select_rows(slice(rank, rank + 1))
    )
    calls = []
    real = dist.all_reduce
    with mock.patch.object(
        dist, "all_reduce", lambda t, *a, **k: calls.append(1) or real(t, *a, **k)
    ):
        clip_grad_norm(list(model.parameters()), 1.0, plan.sharded_groups, plan.pp_cpu_group)
    dtensors = sum(hasattr(p, "placements") for p in model.parameters())
    return len(calls), dtensors


@pytest.mark.slow  # 4 ranks
def test_grad_norm_one_reduction_per_mesh_group(tmp_path):
    """HSDP, 2 replicas x 2 shards (``(Replicate, Shard(0))`` DTensors): the global norm takes one
    all-reduce per (mesh, sharded dim), not one per DTensor parameter."""
    from tests.distributed.helpers import run_ranks

    args = model_args(sparse=False)
    ckpt = save_initial(args, tmp_path / "init")
    for calls, dtensors in run_ranks(_norm_reductions_rank, 4, args, ckpt, timeout=120).values():
        assert dtensors > 20 and calls == 1, (calls, dtensors)
