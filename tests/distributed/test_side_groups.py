"""Host-side (gloo) side groups as an NCCL job builds them: every rank creates only the groups it
belongs to (in the order the code path gives, the same on every rank). Forced on an 8-rank gloo
world with the real layouts (pipeline, the data-parallel group the Engram tables are sharded over,
expert and expert-replicate groups); every side group must sum exactly its own members. With a
plain ``new_group`` per rank the groups' store keys collide and the sums are wrong."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.dims import ParallelDims
from parallel.distributed import cpu_group_for
from pretrain.config import ParallelismConfig

pytestmark = pytest.mark.distributed


def _rank_fn(rank: int, world: int):
    cfg = ParallelismConfig(
        pipeline_parallel_degree=2,
        data_parallel_replicate_degree=4,
        data_parallel_shard_degree=1,
        expert_parallel_degree=2,
        engram_shard_degree=4,
    )
    dims = ParallelDims.from_config(cfg, world)
    mesh, ep_mesh = dims.build_mesh("cpu"), dims.build_ep_mesh("cpu")
    groups = {
        "pp": mesh["pp"].get_group(),
        "tables": dims.dp_group(mesh),
        "ep": ep_mesh["ep"].get_group(),
        "ep_replicate": ep_mesh["ep_replicate"].get_group(),
    }
    side = {name: cpu_group_for(group, force_new=True) for name, group in groups.items()}
    sums = {}
    for name in sorted(groups):  # collectives in one order, as the step issues them
        members = dist.get_process_group_ranks(groups[name])
        assert dist.get_process_group_ranks(side[name]) == members
        assert side[name] is not groups[name]
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value, group=side[name])
        sums[name] = (value.item(), float(sum(r + 1 for r in members)))
    assert cpu_group_for(groups["pp"], force_new=True) is side["pp"]  # one group per rank set
    return sums


@pytest.mark.slow  # 8 ranks
def test_side_groups_sum_their_members_on_8_ranks():
    from tests.distributed.helpers import run_ranks

    for rank, sums in run_ranks(
        _rank_fn, 8, timeout=120, fresh=True
    ).items():  # a broken layout hangs
        for name, (got, want) in sums.items():
            assert got == want, (rank, name, got, want)
