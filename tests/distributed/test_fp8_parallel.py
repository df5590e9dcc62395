"""FP8 (torchao's float8 linears, emulated on CPU, and the Engram GEMM in FP8) under FSDP2 and
tensor parallelism (and, in the slow set, EP, PP and CP) against FP8 in one process, through the
real step: the parity helpers' tolerances, the same as for high precision.

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
from tests.distributed.parity import (
    check_parity,
    make_batch,
    model_args,
    reference,
    run_layout,
    save_initial,
)
from tests.distributed.test_context_parallel import MAKE, cp_args

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


def _args(layout: dict):
    """The parity model for a layout: FSDP needs dense table gradients, TP a vocabulary it
    divides, PP four layers, CP its longer rows."""
    if "context_parallel_degree" in layout:
        return cp_args("gqa", sparse=False)
    tp = "tensor_parallel_degree" in layout
    pp = "pipeline_parallel_degree" in layout
    return model_args(tp or pp, "gqa", 98 if tp else 97, layers=4 if pp else 2)


SLOW = pytest.mark.slow
LAYOUTS = {
    "fsdp2-rowwise": (dict(), to_float8),
    "tp2-rowwise": (dict(tensor_parallel_degree=2), to_float8),
    "fsdp2-tensorwise": pytest.param(dict(), to_float8_tensorwise, marks=SLOW),
    "tp2-tensorwise": pytest.param(
        dict(tensor_parallel_degree=2), to_float8_tensorwise, marks=SLOW
    ),
    "ep2-rowwise": pytest.param(dict(expert_parallel_degree=2), to_float8, marks=SLOW),
    "pp2-rowwise": pytest.param(
        dict(pipeline_parallel_degree=2, data_parallel_shard_degree=1), to_float8, marks=SLOW
    ),
    "cp2-rowwise": pytest.param(dict(context_parallel_degree=2), to_float8, marks=SLOW),
}


@pytest.mark.parametrize("layout, convert", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_fp8_layouts_match_fp8_in_one_process(layout, convert, tmp_path):
    from tests.distributed.helpers import run_ranks

    args = _args(layout)
    make = MAKE if "context_parallel_degree" in layout else make_batch
    ckpt = save_initial(args, tmp_path / "init")
    # a scale taken over a tensor's rows (tensorwise activations, the weight gradient's operands)
    # is each data-parallel rank's own: the one process runs each rank's rows as a micro-batch
    data_parallel = not {"tensor_parallel_degree", "pipeline_parallel_degree"} & set(layout)
    data_parallel &= "context_parallel_degree" not in layout
    want = reference(args, make, convert=convert, accum=2 if data_parallel else 1)
    run = functools.partial(run_layout, make=make, convert=convert)
    check_parity(want, run_ranks(run, 2, layout, args, ckpt))


def _tp_styles(rank: int, world: int, recipe: str) -> dict[str, str]:
    """Each float8 linear's TP input hook, by the class of the style that made it."""
    import torch

    from models.parallelize import parallelize_deepseek_engram
    from models.transformer import Transformer
    from parallel.dims import ParallelDims
    from pretrain.config import ParallelismConfig

    args = model_args(True, "gqa", 98)
    with torch.device("meta"):
        model = Transformer(args)
    to_float8(model, recipe)
    dims = ParallelDims.from_config(ParallelismConfig(tensor_parallel_degree=2), world)
    model, inner, _ = parallelize_deepseek_engram(model, dims, dims.build_mesh("cpu"), "cpu", 0)
    styles = {}
    for name, module in inner.named_modules():
        if type(module).__name__ == "Float8Linear":
            names = [_made_by(hook) for hook in module._forward_pre_hooks.values()]
            styles[name] = ",".join(n for n in names if n)
    return styles


def _made_by(hook) -> str:
    """The class of the style whose ``_prepare_input_fn`` a TP pre-hook calls (DTensor wraps it
    in a lambda over a ``functools.partial``)."""
    for cell in getattr(hook, "__closure__", None) or ():
        inner = getattr(cell.cell_contents, "func", cell.cell_contents)
        qualname = getattr(inner, "__qualname__", "")
        if "_prepare_input_fn" in qualname:
            return qualname.split(".")[0]
    return ""


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_tp_takes_torchaos_float8_styles_for_tensorwise_linears(recipe):
    """Tensorwise float8 linears get torchao's float8 column/row-parallel styles (activations
    cast to float8 before the collectives); rowwise ones keep the plain styles."""
    from tests.distributed.helpers import run_ranks

    styles = run_ranks(_tp_styles, 2, recipe)[0]
    attention = {n: s for n, s in styles.items() if ".attention." in n}
    assert attention and all(
        s.startswith("Float8") == (recipe == "tensorwise") for s in attention.values()
    ), styles
