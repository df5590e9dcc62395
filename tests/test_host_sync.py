"""Host synchronisations on a budget (CPU proxies of what a CUDA step waits for, counted by
``tests.host_sync.HostSyncCounter``):
- forward and backward of the model (MoE routing, Engram, attention, mHC): none;
- under expert parallelism, one read of the split sizes per MoE layer (the count exchange), in
  forward only.
The optimizer step (one read of the global norm) is checked on a GPU with
``torch.cuda.set_sync_debug_mode`` (docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch

from data.batch import plan_lookups
from parallel.expert_parallel import regroup_index
from parallel.plan import ParallelPlan
from pretrain.step import StepModel, forward_backward, lookup_planners, optimizer_step
from tests.distributed.parity import initial_model, make_batch, model_args
from tests.host_sync import HostSyncCounter


def test_host_sync_counter_sees_syncs():
    x = torch.tensor([3, 1, 3])
    with HostSyncCounter() as counter:
        torch.bincount(x)
        x.sum().item()
        x[x > 1]
        x.tolist()
        torch.repeat_interleave(x)
        torch.repeat_interleave(x, output_size=7)  # size given: no sync
    assert counter.counts["aten.bincount.default"] == 1
    assert counter.counts["item"] == 1 and counter.counts["tolist"] == 1
    assert counter.counts["aten.index (boolean mask)"] == 1
    assert counter.counts["aten.repeat_interleave.Tensor"] == 1
    assert counter.total == 5


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_host_sync_budget_forward_backward(attention):
    args = model_args(sparse=True, attention=attention)
    args.moe.seq_aux_loss_coef = 1e-3
    model = initial_model(args)
    sm = StepModel(model, model, ParallelPlan())
    with HostSyncCounter() as counter:
        forward_backward(sm, make_batch(0))
    assert counter.total == 0, dict(counter.counts)
    assert model.layers["0"].engram.table.weight.grad is not None  # Engram and MoE ran


def test_regroup_index_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    recv = torch.randint(0, 4, (3, 5), generator=g)  # [source ranks, local experts]
    starts = (recv.flatten().cumsum(0) - recv.flatten()).view(3, 5)
    want = [int(starts[r, e]) + i for e in range(5) for r in range(3) for i in range(recv[r, e])]
    assert regroup_index(recv, int(recv.sum())).tolist() == want


def _ep_rank(rank: int, world: int):
    from models.parallelize import parallelize_deepseek_engram
    from models.transformer import Transformer
    from parallel.dims import ParallelDims
    from pretrain.config import ParallelismConfig

    dims = ParallelDims.from_config(
        ParallelismConfig(data_parallel_replicate_degree=2, expert_parallel_degree=2), world
    )
    with torch.device("meta"):
        model = Transformer(model_args(sparse=True))
    model, inner, plan = parallelize_deepseek_engram(model, dims, dims.build_mesh("cpu"), "cpu", 0)
    sm = StepModel(model, inner, plan)
    batch = make_batch(0).select_rows(slice(2 * rank, 2 * rank + 2))
    with HostSyncCounter() as counter:
        forward_backward(sm, batch)
    return dict(counter.counts), len(inner.moe_layers())


@pytest.mark.distributed
def test_host_sync_budget_expert_parallel():
    from tests.distributed.helpers import run_ranks

    for rank, (counts, moe_layers) in run_ranks(_ep_rank, 2).items():
        assert counts == {"tolist": moe_layers}, (rank, counts)


def _tables_rank(rank: int, world: int, cp: int):
    from data.batch import context_shard
    from models.parallelize import parallelize_deepseek_engram
    from models.transformer import Transformer
    from parallel.dims import ParallelDims
    from pretrain.config import ParallelismConfig
    from tests.distributed.test_context_parallel import MAKE, cp_args

    layout = dict(engram_shard_degree=2, context_parallel_degree=cp)
    if cp == 1:
        layout["data_parallel_replicate_degree"] = 2
    dims = ParallelDims.from_config(ParallelismConfig(**layout), world)
    with torch.device("meta"):
        model = Transformer(cp_args("mla", sparse=True))
    model, inner, plan = parallelize_deepseek_engram(model, dims, dims.build_mesh("cpu"), "cpu", 0)
    sm = StepModel(model, inner, plan)
    batch = MAKE(0)
    batch = batch.select_rows(slice(2 * rank, 2 * rank + 2)) if cp == 1 else batch
    batch = plan_lookups(context_shard(batch, cp, rank if cp > 1 else 0), lookup_planners(inner))
    with HostSyncCounter() as counter:
        forward_backward(sm, batch)  # twice: the index tables are made once, then reused
        forward_backward(sm, batch)
    return dict(counter.counts)


@pytest.mark.slow  # twin of the dp budget
@pytest.mark.distributed
def test_host_sync_budget_context_parallel():
    """The zigzag gathers, the masks from global indices, the ShortConv halo and the balance
    loss over cp add no host synchronisation: CP 2 x tables 2 counts what data parallel 2 x
    tables 2 counts (the table shards' host-side split counts, read by design)."""
    from tests.distributed.helpers import run_ranks

    cp = run_ranks(_tables_rank, 2, 2)
    dp = run_ranks(_tables_rank, 2, 1)
    assert cp == dp, (cp, dp)
    assert set(cp[0]) <= {"tolist"}, cp


@pytest.mark.parametrize("placement", ["device", "host"])
def test_host_sync_budget_planned_tables(tmp_path, placement):
    """With the loader's lookup plans, an in-memory table (its step row buffer) and a
    host-placed one (cache slots, staged rows) add no host synchronisation to forward and
    backward, at the first step and once the buffers exist."""
    from tests.test_engram_offload import build
    from tests.test_engram_offload import make_batch as table_batch

    sm, opts = build(placement, tmp_path)
    planners = lookup_planners(sm.inner)
    assert planners  # both plan their lookups in the loader
    for step in range(2):
        first, second = (plan_lookups(table_batch(s), planners) for s in (step, step + 5))
        with HostSyncCounter() as counter:
            forward_backward(sm, first, scale=0.5, sync=False)  # two microbatches
            forward_backward(sm, second, scale=0.5)
        assert counter.total == 0, (step, dict(counter.counts))
        assert sm.inner.engram_layers()[0].table.weight.grad.is_coalesced()
        optimizer_step(sm, opts, max_norm=0.5)
