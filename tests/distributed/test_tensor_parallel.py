"""Tensor parallelism against the single-process run: TP2 for GQA and MLA (column/row-parallel
attention and FFN, vocab-parallel LM head and loss), and TP2 x FSDP2 with EP2 and Engram-table
parallelism on 4 ranks; each with and without sequence parallelism."""

from __future__ import annotations

import pytest

from models.parallel_plans import validate_parallelism
from parallel.dims import ParallelDims
from pretrain.config import ParallelismConfig
from tests.distributed.parity import (
    SEQ,
    check_parity,
    model_args,
    reference,
    run_layout,
    save_initial,
)

pytestmark = pytest.mark.distributed
VOCAB = 98  # divisible by the tensor-parallel degree


@pytest.mark.parametrize(
    "world, attention, ep, tables, sp",
    [
        (2, "gqa", 1, 1, False),
        (2, "mla", 1, 1, True),
        *(
            pytest.param(*layout, marks=pytest.mark.slow)
            for layout in [(2, "gqa", 1, 1, True), (2, "mla", 1, 1, False)]
            + [(4, "mla", 2, 2, sp) for sp in (False, True)]
        ),
    ],
)
def test_tensor_parallel_matches_single_process(world, attention, ep, tables, sp, tmp_path):
    from tests.distributed.helpers import run_ranks

    layout = dict(
        tensor_parallel_degree=2,
        expert_parallel_degree=ep,
        engram_shard_degree=tables,
        sequence_parallel=sp,
    )
    args = model_args(True, attention, VOCAB)
    dims = ParallelDims.from_config(ParallelismConfig(**layout), world)
    validate_parallelism(args, dims, sp, seq_len=SEQ)
    ckpt = save_initial(args, tmp_path / "init")
    check_parity(reference(args), run_ranks(run_layout, world, layout, args, ckpt))
