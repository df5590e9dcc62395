"""DDP, FSDP2 and HSDP (2 replicas x 2 shards) against the single-process run through the real
step (``tests.distributed.parity``): losses, global gradient norms and gradients at every step, and
the final parameters, on every rank.

The gloo ranks split each batch; the single-process reference takes the whole batch.
"""

from __future__ import annotations

import pytest

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
