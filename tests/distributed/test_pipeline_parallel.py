"""Pipeline parallelism against the single-process run: PP2 with GPipe, 1F1B and interleaved 1F1B
(2 stages per rank), PP2 x Engram-table parallelism with the lookups planned per microbatch as the
loader plans them, and the combined TP2 x PP2 x EP2 layout (8 ranks, tables sharded over the
data-parallel ranks). Every stage's gradients and parameters are compared on every rank."""

from __future__ import annotations

import pytest

from tests.distributed.parity import check_parity, model_args, reference, run_layout, save_initial

pytestmark = pytest.mark.distributed
VOCAB = 98


@pytest.mark.parametrize(
    "world, schedule, stages, tp, ep, tables",
    [
        pytest.param(2, "gpipe", 1, 1, 1, 1, marks=pytest.mark.slow),
        (2, "1f1b", 1, 1, 1, 1),
        pytest.param(2, "interleaved_1f1b", 2, 1, 1, 1, marks=pytest.mark.slow),
        # PP2 x DP2 with the tables sharded over the 2 replicas
        pytest.param(4, "1f1b", 1, 1, 1, 2, marks=pytest.mark.slow),
        pytest.param(8, "1f1b", 1, 2, 2, 2, marks=pytest.mark.slow),
    ],
    ids=["gpipe", "1f1b", "interleaved", "pp2_tables2", "tp2_pp2_ep2_tables2"],
)
def test_pipeline_matches_single_process(world, schedule, stages, tp, ep, tables, tmp_path):
    from tests.distributed.helpers import run_ranks

    layout = dict(
        pipeline_parallel_degree=2,
        data_parallel_replicate_degree=world // (2 * tp),
        data_parallel_shard_degree=1,
        tensor_parallel_degree=tp,
        expert_parallel_degree=ep,
        engram_shard_degree=tables,
        pipeline_schedule=schedule,
        pipeline_stages_per_rank=stages,
    )
    args = model_args(True, "mla", VOCAB, layers=4)
    ckpt = save_initial(args, tmp_path / "init")
    check_parity(reference(args), run_ranks(run_layout, world, layout, args, ckpt))
