"""Initialisation does not depend on the layout: after the parallel plan and ``materialize`` every
parameter (TP and FSDP DTensors, expert and table shards) equals the single-process init."""

from __future__ import annotations

import pytest
import torch

from models.parallelize import parallelize_deepseek_engram
from models.transformer import Transformer
from parallel.dims import ParallelDims
from pretrain.config import ParallelismConfig
from tests.distributed.parity import full_state, initial_model, model_args

pytestmark = pytest.mark.distributed


def _rank_fn(rank: int, world: int, layout: dict):
    dims = ParallelDims.from_config(ParallelismConfig(**layout), world)
    with torch.device("meta"):
        model = Transformer(model_args(True, "mla", 98))
    _, inner, _ = parallelize_deepseek_engram(model, dims, dims.build_mesh("cpu"), "cpu", seed=0)
    return full_state(inner)


@pytest.mark.parametrize(
    "world, layout",
    [
        (2, dict(tensor_parallel_degree=2, data_parallel_shard_degree=1)),
        pytest.param(
            4,
            dict(
                tensor_parallel_degree=2,
                data_parallel_shard_degree=2,
                expert_parallel_degree=2,
                engram_shard_degree=2,
            ),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_init_is_layout_independent(world, layout):
    from tests.distributed.helpers import run_ranks

    want = initial_model(model_args(True, "mla", 98)).state_dict()
    for rank, state in run_ranks(_rank_fn, world, layout).items():
        assert state.keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=f"{rank} {name}")
