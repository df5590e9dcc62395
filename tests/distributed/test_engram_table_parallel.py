"""Engram-table parallelism against the single-process run (2 and 4 gloo ranks): same losses, same
table rows and same other parameters after a few steps with row-wise Adam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from models.parallelize import parallelize_deepseek_engram
from models.transformer import Transformer
from parallel.dims import ParallelDims
from parallel.engram_table_parallel import build_shard_plan, row_bounds
from pretrain.config import OptimizerConfig, ParallelismConfig
from pretrain.optimizer import Optimizers
from tests.distributed.test_data_parallel import _args, _full_state, _initial_state, _train
from tests.distributed.test_expert_parallel import _gather

pytestmark = pytest.mark.distributed


def test_row_bounds_follow_torch_chunk():
    for rows, shards in [(10, 4), (12, 4), (7, 2), (3, 4)]:
        sizes = [len(c) for c in torch.arange(rows).chunk(shards)]
        bounds = row_bounds(rows, shards)
        assert [b - a for a, b in zip(bounds, bounds[1:])][: len(sizes)] == sizes


def test_shard_plan_dedups_and_counts_per_owner():
    flat = np.array([[[7, 1], [7, 9]], [[3, 3], [9, 0]]])
    plan = build_shard_plan(flat, row_bounds(10, 4))  # shards [0,3) [3,6) [6,9) [9,10)
    assert plan.unique_ids.tolist() == [0, 1, 3, 7, 9]
    assert plan.send_counts.tolist() == [2, 1, 1, 1]
    np.testing.assert_array_equal(plan.unique_ids[plan.inverse], flat)


def _rank_fn(rank: int, world: int):
    dims = ParallelDims.from_config(
        ParallelismConfig(data_parallel_replicate_degree=world, engram_table_parallel_degree=world),
        world,
    )
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = Transformer(_args(sparse=True))
    model, inner, plan = parallelize_deepseek_engram(model, dims, mesh, "cpu", seed=0)
    table = inner.engram_layers()[0].table
    full = _initial_state(True).state_dict()
    own = {k: v for k, v in full.items() if not k.endswith("table.weight")}
    inner.load_state_dict(own, strict=False)
    with torch.no_grad():
        table.weight.copy_(
            full["layers.0.engram.table.weight"][table.bounds[rank] : table.bounds[rank + 1]]
        )
    opts = Optimizers(model, OptimizerConfig(lr=1e-2))
    per = 4 // world
    losses, grads = _train(model, inner, opts, slice(per * rank, per * rank + per), plan)
    mean = [t.item() for t in (dist.all_reduce(x) or x / world for x in losses)]
    # the table checkpoints as a global DTensor, so the state is whole; its gradient is per shard
    name = "layers.0.engram.table.weight"
    grads[name] = torch.cat(_gather(grads[name]))
    return mean, grads, _full_state(inner)


@pytest.mark.parametrize("world", [2, 4])
def test_table_parallel_matches_single_process(world):
    from tests.distributed.helpers import run_ranks
    from tests.distributed.test_data_parallel import _reference, check_parity

    check_parity(_reference(sparse=True), run_ranks(_rank_fn, world))
