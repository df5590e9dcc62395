"""Pipeline parallelism against the single-process run: PP2 with GPipe, 1F1B and interleaved 1F1B
(2 stages per rank), and the combined TP2 x PP2 x EP2 layout (8 ranks, Engram tables sharded over
the data-parallel ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from models.parallelize import parallelize_deepseek_engram
from models.transformer import Transformer
from parallel.dims import ParallelDims
from pretrain.config import OptimizerConfig, ParallelismConfig
from pretrain.optimizer import Optimizers, clip_grad_norm
from pretrain.pipeline_runner import PipelineRunner
from tests.distributed.test_data_parallel import (
    STEPS,
    _batch,
    _full_state,
    _grads,
    check_parity,
)
from tests.distributed.test_data_parallel import _args as _base_args
from tests.distributed.test_data_parallel import _train as _plain_train

pytestmark = pytest.mark.distributed
VOCAB = 98


def _args():
    args = _base_args(True, "mla", VOCAB)
    args.num_layers = 4
    return args


def _reference():
    model = Transformer(_args())
    torch.manual_seed(0)
    model.init_weights()
    opts = Optimizers(model, OptimizerConfig(lr=1e-2))
    losses, grads = _plain_train(model, model, opts, slice(0, 4))
    return [x.item() for x in losses], grads, _full_state(model)


def _merged(local: dict) -> dict:
    """Union of every rank's entries (pipeline stages hold different parameters)."""
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    merged = {}
    for part in everything:
        for name, value in part.items():
            merged.setdefault(name, value)
    return merged


def _rank_fn(rank: int, world: int, schedule: str, stages: int, tp: int, ep: int, ckpt: str):
    dp = world // (2 * tp)
    cfg = ParallelismConfig(
        pipeline_parallel_degree=2,
        data_parallel_replicate_degree=dp,
        tensor_parallel_degree=tp,
        expert_parallel_degree=ep,
        engram_table_parallel_degree=dp,
        pipeline_schedule=schedule,
        pipeline_stages_per_rank=stages,
    )
    dims = ParallelDims.from_config(cfg, world)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = Transformer(_args())
    model, inner, plan = parallelize_deepseek_engram(
        model, dims, mesh, "cpu", 0, stages_per_rank=stages
    )
    state = get_model_state_dict(inner)
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(inner, state)
    runner = PipelineRunner(plan, cfg, torch.device("cpu"), 1, inner)
    opts = Optimizers(model, OptimizerConfig(lr=1e-2))
    dp_rank = mesh["dp_replicate"].get_local_rank()
    rows = slice(dp_rank * 4 // dp, (dp_rank + 1) * 4 // dp)
    losses, first = [], {}
    for step in range(STEPS):
        tokens, hash_ids = _batch(step)
        tokens, hash_ids = tokens[rows], {k: v[rows] for k, v in hash_ids.items()}
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "positions": torch.arange(16).expand(len(tokens), 16),
            "doc_ids": torch.zeros(len(tokens), 16, dtype=torch.long),
            "hash_ids": hash_ids,
        }
        losses.append(runner.train(batch))
        plan.sync_grads()
        if step == 0:
            first = _grads(inner)
        clip_grad_norm(list(model.parameters()), 0.5, plan.sharded_groups, plan.pp_cpu_group)
        opts.step()
        opts.zero_grad()
        for moe in inner.moe_layers():
            dist.all_reduce(moe.router.tokens_per_expert, group=dims.dp_group(mesh))
            moe.router.update_bias()
    mean = []
    for loss in losses:
        total = loss.clone()
        dist.all_reduce(total)
        mean.append(total.item() / world)
    grads = {}
    for name, grad in first.items():
        if ".experts." in name or name.endswith("table.weight"):
            grad = _gather_rows(grad, name, mesh, ep, dp)
        grads[name] = grad
    return mean, _merged(grads), _merged(_full_state(inner))


def _gather_rows(local, name, mesh, ep, dp):
    """Rows of an expert/table shard from the ranks sharing this rank's pp and tp coordinates."""
    group = mesh["dp_replicate"].get_group()
    pieces = [None] * dist.get_world_size(group)
    dist.all_gather_object(pieces, local, group=group)
    keep = ep if ".experts." in name else dp
    return torch.cat(pieces[:keep])


@pytest.mark.parametrize(
    "world, schedule, stages, tp, ep",
    [
        (2, "gpipe", 1, 1, 1),
        (2, "1f1b", 1, 1, 1),
        (2, "interleaved_1f1b", 2, 1, 1),
        (8, "1f1b", 1, 2, 2),
    ],
)
def test_pipeline_matches_single_process(world, schedule, stages, tp, ep, tmp_path):
    from tests.distributed.helpers import run_ranks

    ckpt = str(tmp_path / "init")
    model = Transformer(_args())
    torch.manual_seed(0)
    model.init_weights()
    dcp.save(model.state_dict(), checkpoint_id=ckpt)
    check_parity(_reference(), run_ranks(_rank_fn, world, schedule, stages, tp, ep, ckpt))
