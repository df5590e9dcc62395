"""Context parallelism against the single-process run (``tests.distributed.parity``): losses,
global gradient norms and gradients at every step, and the final parameters, on every rank.

Each row is 80 tokens in four documents whose edges (13, 30, 57) fall inside the zigzag chunks
(20 tokens at cp 2, 10 at cp 4), so attention's document mask, the Engram ShortConv's halo and
the MoE balance loss all cross ranks. The conv starts from the reference's non-zero init so its
halo changes the forward, not only the gradients.

Dense tables (FSDP-sharded with the rest) run with MLA, sparse ones (row-sharded) with GQA: the
GQA run with dense tables reaches a gate score of 2e-5 at step 3, where the signed sqrt's slope
(1 / 2 sqrt|x|) turns float32 rounding into an O(1) difference of that gate's gradients, for
plain FSDP too (7e-3 there). In float64 the same CP run matches to 2e-5 at step 3 (FSDP: 5e-6),
so the difference is rounding, not a wrong sum; the step-1 gradients match to 1e-6 everywhere.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from data.batch import zigzag_index
from tests.distributed.parity import (
    STEPS,
    check_parity,
    make_batch,
    model_args,
    reference,
    run_layout,
    save_initial,
)

pytestmark = pytest.mark.distributed

SEQ_CP = 80
MAKE = functools.partial(make_batch, seq=SEQ_CP, doc_starts=(0, 13, 30, 57))


def cp_args(attention: str, sparse: bool):
    args = model_args(sparse, attention)
    args.max_seq_len = SEQ_CP
    args.engram.conv_init = "reference"
    args.moe.seq_aux_loss_coef = 0.01
    return args


@pytest.mark.parametrize(
    "world, layout, attention, sparse",
    [
        (2, dict(context_parallel_degree=2, engram_shard_degree=2), "gqa", True),
        *(
            pytest.param(*case, marks=pytest.mark.slow)
            for case in [
                (2, dict(context_parallel_degree=2), "mla", False),
                (4, dict(context_parallel_degree=4), "mla", False),
                (4, dict(context_parallel_degree=4, engram_shard_degree=4), "gqa", True),
            ]
        ),
    ],
    ids=["cp2-gqa-tables2", "cp2-mla", "cp4-mla", "cp4-gqa-tables4"],
)
def test_context_parallel_matches_single_process(world, layout, attention, sparse, tmp_path):
    from tests.distributed.helpers import run_ranks

    args = cp_args(attention, sparse)
    ckpt = save_initial(args, tmp_path / "init")
    results = run_ranks(run_layout, world, layout, args, ckpt, 1, STEPS, None, MAKE)
    check_parity(reference(args, MAKE), results)


@pytest.mark.slow  # cp2 x tables2 is the default twin
def test_context_parallel_with_fsdp_and_tables(tmp_path):
    """CP 2 x FSDP 2 (FSDP over the flattened dp_shard x cp mesh), tables row-sharded over all 4
    ranks, each data-parallel pair splitting its rows' chunks."""
    from tests.distributed.helpers import run_ranks

    args = cp_args("mla", sparse=True)
    ckpt = save_initial(args, tmp_path / "init")
    layout = dict(context_parallel_degree=2, data_parallel_shard_degree=2, engram_shard_degree=4)
    check_parity(
        reference(args, MAKE), run_ranks(run_layout, 4, layout, args, ckpt, 1, STEPS, None, MAKE)
    )


@pytest.mark.slow  # cp2 x tables2 is the default twin
@pytest.mark.parametrize(
    "layout",
    [
        dict(context_parallel_degree=2, tensor_parallel_degree=2, data_parallel_shard_degree=1),
        dict(context_parallel_degree=2, data_parallel_shard_degree=2, expert_parallel_degree=2),
    ],
    ids=["cp2-tp2", "cp2-fsdp2-ep2"],
)
def test_context_parallel_composes_with_tensor_and_expert_parallel(layout, tmp_path):
    """TP 2 splits the heads whose keys and values CP gathers; EP 2 routes each cp rank's own
    tokens to experts whose replicas on the other cp rank sum their gradients."""
    from tests.distributed.helpers import run_ranks

    args = cp_args("mla", sparse=False)
    args.vocab_size = 96  # divisible by tp
    ckpt = save_initial(args, tmp_path / "init")
    make = functools.partial(MAKE.func, **MAKE.keywords, vocab=96)
    results = run_ranks(run_layout, 4, layout, args, ckpt, 1, STEPS, None, make)
    check_parity(reference(args, make), results)


def test_zigzag_chunks_cover_the_row_once_and_balance_causal_work():
    for degree in (1, 2, 4):
        held = [zigzag_index(SEQ_CP, degree, r) for r in range(degree)]
        np.testing.assert_array_equal(np.sort(np.concatenate(held)), np.arange(SEQ_CP))
        work = {int((index + 1).sum()) for index in held}  # keys each rank's queries see
        assert len(work) == 1
    with pytest.raises(ValueError, match="divisible by 2 \\* parallelism.context_parallel_degree"):
        zigzag_index(30, 4, 0)


@pytest.mark.parametrize(
    "layout, world, seq_len, sp, message",
    [
        (dict(context_parallel_degree=2, pipeline_parallel_degree=2), 4, 80, False, "pipeline"),
        (
            dict(context_parallel_degree=2, tensor_parallel_degree=2),
            4,
            80,
            True,
            "sequence_parallel",
        ),
        (dict(context_parallel_degree=4), 4, 60, False, "divisible by 2 \\* parallelism"),
        (dict(context_parallel_degree=4), 4, 64, False, "fewer than the Engram ShortConv's left"),
        (
            dict(context_parallel_degree=2, data_parallel_shard_degree=2, engram_shard_degree=2),
            4,
            80,
            False,
            "engram_shard_degree",
        ),
    ],
    ids=["pp", "sp", "seq_len", "halo", "tables"],
)
def test_context_parallel_layouts_are_checked_up_front(layout, world, seq_len, sp, message):
    from models.parallel_plans import validate_parallelism
    from parallel.dims import ParallelDims
    from pretrain.config import ParallelismConfig

    args = cp_args("mla", False)
    args.vocab_size = 96  # divisible by tp
    with pytest.raises(ValueError, match=message):
        dims = ParallelDims.from_config(ParallelismConfig(**layout), world)
        validate_parallelism(args, dims, sp, seq_len)


@pytest.mark.slow  # cp2 x tables2 is the default twin
def test_trainer_with_context_parallelism_matches_one_process(corpus, tmp_path):
    """``pretrain.train`` end to end: the loader hashes whole rows and keeps each rank's zigzag
    share, 4 steps train under CP 2 x tables 2, and the validation loss equals the one of the
    same job run in one process."""
    from tests.distributed.helpers import run_ranks
    from tests.distributed.test_reshard import _fit

    cp = run_ranks(_fit, 2, str(corpus), str(tmp_path / "cp2"), "cp2", fresh=True)
    single = run_ranks(_fit, 1, str(corpus), str(tmp_path / "single"), "single", fresh=True)
    assert all(step == 4 for _, step in [*cp.values(), *single.values()])
    assert cp[0][0] == pytest.approx(single[0][0], rel=1e-4)


def _fit_cp(rank, world, corpus, dump, interval):
    from pretrain.config import load_config
    from pretrain.train import Trainer
    from tests.distributed.test_reshard import _overrides

    overrides = _overrides(corpus, dump, "cp2") + [f"--checkpoint.interval={interval}"]
    trainer = Trainer(load_config("pretrain/configs/debug.toml", overrides))
    started = trainer.step
    summary = trainer.fit()
    state = {  # rank 0's: full FSDP tensors, its own table shards
        n: v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
        for n, v in trainer.model.state_dict().items()
    }
    return started, summary["val_loss"], state


@pytest.mark.slow  # cp2 x tables2 is the default twin
def test_context_parallel_resume_is_bit_identical(corpus, tmp_path):
    """CP 2 x tables 2: a run stopped at step 2 and resumed (loader state of each cp rank,
    FSDP-over-cp shards, table shards) ends where the uninterrupted run ends, bit for bit."""
    import shutil

    import torch

    from tests.distributed.helpers import run_ranks

    whole = run_ranks(_fit_cp, 2, str(corpus), str(tmp_path / "whole"), 4, fresh=True)
    run_ranks(_fit_cp, 2, str(corpus), str(tmp_path / "cut"), 2, fresh=True)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000004")
    resumed = run_ranks(_fit_cp, 2, str(corpus), str(tmp_path / "cut"), 2, fresh=True)
    assert resumed[0][0] == 2 and whole[0][0] == 0
    assert resumed[0][1] == whole[0][1]
    for name, value in whole[0][2].items():
        assert torch.equal(resumed[0][2][name], value), name
