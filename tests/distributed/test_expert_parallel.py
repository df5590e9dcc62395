"""Expert parallelism against the single-process run: EP2 over 2 DDP ranks, EP2 x 2 replicas over 4
ranks with Engram-table parallelism, and EP2 + table parallelism under FSDP2: same losses,
first-step gradients and parameters."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from models.parallelize import parallelize_deepseek_engram
from models.transformer import Transformer
from parallel.dims import ParallelDims
from pretrain.config import OptimizerConfig, ParallelismConfig
from pretrain.optimizer import Optimizers
from tests.distributed.test_data_parallel import _args, _full_state, _initial_state, _train

pytestmark = pytest.mark.distributed


def _gather(local: torch.Tensor) -> torch.Tensor:
    """Every rank's local tensor (ranks in order), to concatenate row shards for the comparison."""
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, local.detach().clone())
    return shards


def _rank_fn(rank: int, world: int, ep: int, etp: int, fsdp: bool):
    cfg = ParallelismConfig(
        data_parallel_replicate_degree=1 if fsdp else world,
        data_parallel_shard_degree=world if fsdp else 1,
        expert_parallel_degree=ep,
        engram_table_parallel_degree=etp,
    )
    dims = ParallelDims.from_config(cfg, world)
    with torch.device("meta"):
        model = Transformer(_args(True))
    model, inner, plan = parallelize_deepseek_engram(model, dims, dims.build_mesh("cpu"), "cpu", 0)
    # every sharded parameter (FSDP, expert and table shards) takes its rows of the full weights
    set_model_state_dict(
        inner, _initial_state(True).state_dict(), options=StateDictOptions(full_state_dict=True)
    )
    opts = Optimizers(model, OptimizerConfig(lr=1e-2))
    per = 4 // world
    losses, grads = _train(model, inner, opts, slice(per * rank, per * rank + per), plan)
    mean = [t.item() / world for t in (_sum(x) for x in losses)]
    state = _full_state(inner)  # row-sharded parameters checkpoint as global DTensors already
    for name in [n for n in grads if ".experts." in n or n.endswith("table.weight")]:
        keep = ep if ".experts." in name else etp
        grads[name] = torch.cat(_gather(grads[name])[:keep])
    return mean, grads, state


def _sum(x):
    dist.all_reduce(x)
    return x


@pytest.mark.parametrize(
    "world, ep, etp, fsdp", [(2, 2, 1, False), (4, 2, 4, False), (2, 2, 2, True)]
)
def test_expert_parallel_matches_single_process(world, ep, etp, fsdp):
    from tests.distributed.helpers import run_ranks
    from tests.distributed.test_data_parallel import _reference, check_parity

    check_parity(_reference(sparse=True), run_ranks(_rank_fn, world, ep, etp, fsdp))
