"""Expert parallelism against the single-process run: EP2 over 2 DDP ranks, EP2 x 2 replicas over 4
ranks with Engram-table parallelism, and EP2 + table parallelism under FSDP2; and expert counts
that EP does not divide (5 over 2 ranks, 7 over 4: padding slots on the last rank): losses, norms
and gradients at every step, and the parameters, on every rank."""

from __future__ import annotations

import pytest

from tests.distributed.parity import check_parity, model_args, reference, run_layout, save_initial

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    "world, ep, tables, fsdp, experts",
    [
        pytest.param(2, 2, 1, False, 4, marks=pytest.mark.slow),
        pytest.param(4, 2, 4, False, 4, marks=pytest.mark.slow),
        pytest.param(2, 2, 2, True, 4, marks=pytest.mark.slow),
        (2, 2, 2, False, 5),  # uneven experts, tables sharded too
        pytest.param(4, 4, 4, True, 7, marks=pytest.mark.slow),
    ],
)
def test_expert_parallel_matches_single_process(world, ep, tables, fsdp, experts, tmp_path):
    from tests.distributed.helpers import run_ranks

    layout = dict(
        data_parallel_replicate_degree=1 if fsdp else world,
        expert_parallel_degree=ep,
        engram_shard_degree=tables,
    )
    args = model_args(sparse=True)
    args.moe.num_routed_experts = experts
    ckpt = save_initial(args, tmp_path / "init")
    check_parity(reference(args), run_ranks(run_layout, world, layout, args, ckpt))
