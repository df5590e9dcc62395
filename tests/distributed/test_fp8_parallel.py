"""FP8 (torchao's float8 linears, emulated on CPU, and the Engram GEMM in FP8) under FSDP2 and
tensor parallelism against FP8 in one process, through the real step: the parity helpers'
tolerances, the same as for high precision.

FSDP2 all-gathers the high-precision weights (gloo cannot send float8, so the float8 all-gather
of the tensorwise recipe is checked on a GPU: tests/test_gpu.py); tensor parallelism keeps its
high-precision collectives, and the float8 casts of sharded weights take their scales over the
whole tensor (DTensor reduces the amax across the shards).
"""

from __future__ import annotations

import functools

import pytest

from models.quantize import build_quantize_converter
from pretrain.config import QuantizeConfig
from tests.distributed.parity import check_parity, model_args, reference, run_layout, save_initial

pytestmark = pytest.mark.distributed
pytest.importorskip("torchao")


def to_float8(model, recipe: str = "rowwise") -> None:
    """The [quantize] converter of a job with FP8 linears and the Engram GEMM in FP8."""
    section = QuantizeConfig(engram=True)
    section.linear.float8.enable = True
    section.linear.float8.recipe_name = recipe
    build_quantize_converter(section).convert(model)


def to_float8_tensorwise(model) -> None:
    to_float8(model, "tensorwise")


@pytest.mark.parametrize(
    "layout, convert, vocab",
    [
        (dict(), to_float8, 97),  # FSDP2 over both ranks
        (dict(tensor_parallel_degree=2), to_float8, 98),
        pytest.param(dict(), to_float8_tensorwise, 97, marks=pytest.mark.slow),
        pytest.param(
            dict(tensor_parallel_degree=2), to_float8_tensorwise, 98, marks=pytest.mark.slow
        ),
    ],
    ids=["fsdp2-rowwise", "tp2-rowwise", "fsdp2-tensorwise", "tp2-tensorwise"],
)
def test_fp8_layouts_match_fp8_in_one_process(layout, convert, vocab, tmp_path):
    from tests.distributed.helpers import run_ranks

    args = model_args(sparse=vocab == 98, attention="gqa", vocab=vocab)  # FSDP: dense table grads
    ckpt = save_initial(args, tmp_path / "init")
    # tensorwise scales the activations by their amax over the whole tensor, which a data-parallel
    # rank takes over its own rows: the one process runs each rank's rows as a micro-batch
    per_rank = convert is to_float8_tensorwise and "tensor_parallel_degree" not in layout
    want = reference(args, convert=convert, accum=2 if per_rank else 1)
    got = run_ranks(functools.partial(run_layout, convert=convert), 2, layout, args, ckpt)
    check_parity(want, got)
