"""Engram-table parallelism against the single-process run (2 and 4 gloo ranks, replicated and
FSDP): the loader-side planner routes the lookups, row-wise Adam updates the owners' rows, and
losses, norms, every gradient (table rows gathered from the owners) and the parameters match."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallel.engram_table_parallel import ShardPlanner, build_shard_plan, row_bounds
from tests.distributed.parity import check_parity, model_args, reference, run_layout, save_initial

pytestmark = pytest.mark.distributed


def test_row_bounds_follow_torch_chunk():
    for rows, shards in [(10, 4), (12, 4), (7, 2), (3, 4)]:
        sizes = [len(c) for c in torch.arange(rows).chunk(shards)]
        bounds = row_bounds(rows, shards)
        assert [b - a for a, b in zip(bounds, bounds[1:])][: len(sizes)] == sizes


def test_shard_plan_dedups_and_counts_per_owner():
    flat = np.array([[[7, 1], [7, 9]], [[3, 3], [9, 0]]])
    plan = build_shard_plan(flat, row_bounds(10, 4))  # shards [0,3) [3,6) [6,9) [9,10)
    assert plan.unique_ids.tolist() == [[0, 1, 3, 7, 9]]
    assert plan.send_counts.tolist() == [[2, 1, 1, 1]]
    np.testing.assert_array_equal(plan.unique_ids[0][plan.inverse], flat)


def test_shard_plan_per_chunk():
    """Each pipeline microbatch is deduplicated on its own, padded to the longest chunk."""
    flat = np.array([[[7, 1]], [[1, 1]]])
    plan = ShardPlanner(np.array([0, 0]), row_bounds(10, 2))(flat, num_chunks=2)
    assert plan.unique_ids.tolist() == [[1, 7], [1, 0]]
    assert plan.send_counts.tolist() == [[1, 1], [1, 0]]
    for chunk in range(2):
        np.testing.assert_array_equal(plan.unique_ids[chunk][plan.inverse[chunk]], flat[chunk])


@pytest.mark.parametrize(
    "world, replicate",
    [(2, 2), *(pytest.param(w, r, marks=pytest.mark.slow) for w, r in [(4, 4), (2, 1)])],
    ids=["ddp2", "ddp4", "fsdp2"],
)
def test_table_parallel_matches_single_process(world, replicate, tmp_path):
    from tests.distributed.helpers import run_ranks

    args = model_args(sparse=True)
    layout = dict(data_parallel_replicate_degree=replicate, engram_shard_degree=world)
    ckpt = save_initial(args, tmp_path / "init")
    check_parity(reference(args), run_ranks(run_layout, world, layout, args, ckpt))


def _exchanges_rank(rank: int, world: int, placement: str):
    import dataclasses

    from data.batch import plan_lookups
    from models.parallelize import parallelize_deepseek_engram
    from models.tables.offload import place_engram_tables
    from models.transformer import Transformer
    from parallel.dims import ParallelDims
    from pretrain.config import ParallelismConfig
    from pretrain.step import StepModel, forward_backward, lookup_planners
    from tests.distributed.parity import make_batch

    args = model_args(sparse=True)
    args.engram.hash = dataclasses.replace(args.engram.hash, layer_ids=[0, 1])
    layout = ParallelismConfig(data_parallel_replicate_degree=2, engram_shard_degree=2)
    dims = ParallelDims.from_config(layout, world)
    with torch.device("meta"):
        model = Transformer(args)

    def place(m):
        return place_engram_tables(m, placement, "100%", "cpu", None)

    model, inner, plan = parallelize_deepseek_engram(
        model, dims, dims.build_mesh("cpu"), "cpu", 0, "full", place_tables=place
    )
    sm = StepModel(model, inner, plan)
    calls = {"exchanges": 0, "lookups": 0}
    for engram in inner.engram_layers():
        exchange = engram.table.exchange_counts

        def counted(send, exchange=exchange):
            calls["exchanges"] += 1
            return exchange(send)

        engram.table.exchange_counts = counted
        engram.table.register_forward_hook(
            lambda *_: calls.__setitem__("lookups", calls["lookups"] + 1)
        )
    batch = make_batch(0).select_rows(slice(2 * rank, 2 * rank + 2))
    batch = dataclasses.replace(batch, engram={0: batch.engram[0], 1: batch.engram[0]})
    forward_backward(sm, plan_lookups(batch, lookup_planners(inner)))
    return calls, len(inner.engram_layers())


@pytest.mark.parametrize("placement", ["device", "host"])
def test_one_count_exchange_per_batch_and_no_lookup_in_the_recompute(placement):
    """Two row-sharded Engram layers in recomputed blocks: one exchange of split counts serves
    both layers' lookups, and each layer looks up once (the recompute reuses the rows)."""
    from tests.distributed.helpers import run_ranks

    for rank, (calls, layers) in run_ranks(_exchanges_rank, 2, placement).items():
        assert layers == 2
        assert calls == {"exchanges": 1, "lookups": layers}, (rank, calls)
