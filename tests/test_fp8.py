"""FP8 training through torchao ([quantize], models/quantize.py), emulated on CPU.

The numerics are checked against a quantiser written here from the recipes' definition (scale =
448 / amax per tensor or per row, rounded down to a power of two for the rowwise recipes), not
against torchao's own functions; the conversion list against the module types; the Engram GEMM
against the high-precision product it replaces.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

from models.flavors import resolve_model_args
from models.quantize import (
    Float8EngramMatmul,
    build_quantize_converter,
    engram_config,
    float8_plan,
    linear_config,
)
from models.transformer import Transformer
from pretrain.config import QuantizeConfig, load_config
from tests.test_models import tiny

pytest.importorskip("torchao")

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def qdq(t: torch.Tensor, dim: int | None = None, pow2: bool = False) -> torch.Tensor:
    """Quantise to float8 e4m3 and back: one scale per tensor (``dim=None``) or one per slice
    reduced along ``dim``; ``pow2``: the scale rounded down to a power of two."""
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = (E4M3_MAX / amax.double().clamp(min=1e-12)).float()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return (t * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() / scale


def section(recipe="rowwise", engram=False, **float8) -> QuantizeConfig:
    q = QuantizeConfig(engram=engram)
    q.linear.float8.enable = True
    q.linear.float8.recipe_name = recipe
    for key, value in float8.items():
        setattr(q.linear.float8, key, value)
    return q


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_converted_linear_equals_the_hand_quantised_product(recipe):
    torch.manual_seed(0)
    model = Transformer(tiny())
    model.init_weights()
    build_quantize_converter(section(recipe)).convert(model)
    layer = model.layers["0"].attention.wq
    assert type(layer).__name__ == "Float8Linear"
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    out = layer(x)
    w = layer.weight.detach()
    rowwise = recipe == "rowwise"
    if rowwise:  # per token and per output channel
        want = qdq(x.detach(), -1, True) @ qdq(w, 1, True).T
    else:
        want = qdq(x.detach()) @ qdq(w).T
    assert _relative(out.detach(), want) < 1e-6
    assert _relative(out.detach(), x.detach() @ w.T) > 1e-3  # it is not the plain product
    if rowwise:  # input gradient: per row of the output gradient, per input column of w
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        want_grad = qdq(grad_out, -1, True) @ qdq(w, 0, True)
        assert _relative(x.grad, want_grad) < 1e-6
        assert _relative(x.grad, grad_out @ w) > 1e-3


def test_engram_gemm_runs_in_float8_and_keeps_the_row_gradient_in_high_precision():
    """The layer's key/value product is the float8 product; the rows' gradient (what the row-wise
    optimizer reads) is the high-precision one, and the weight gradient the float8 one."""
    torch.manual_seed(0)
    matmul = Float8EngramMatmul(engram_config(linear_config("rowwise", emulate=True)))
    rows = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(48, 16, requires_grad=True)
    bias = torch.randn(48)
    out = matmul(rows, weight, bias)
    want = qdq(rows.detach(), -1, True) @ qdq(weight.detach(), 1, True).T + bias
    assert _relative(out.detach(), want) < 1e-6
    assert _relative(out.detach(), rows.detach() @ weight.detach().T + bias) > 1e-3
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert _relative(rows.grad, grad_out @ weight.detach()) < 1e-6  # high precision
    flat_go, flat_rows = grad_out.reshape(-1, 48), rows.detach().reshape(-1, 16)
    want_gw = qdq(flat_go, 0, True).T @ qdq(flat_rows, 0, True)  # per column of the token axis
    assert _relative(weight.grad, want_gw) < 1e-6

    # the converter installs it on the Engram layer: its output is the float8 product's
    model = Transformer(tiny())
    torch.manual_seed(1)
    model.init_weights()
    engram = model.layers["0"].engram
    hidden = torch.randn(2, 6, 1, 32)
    fetched = torch.randn(2, 6, engram.cfg.embed_dim)
    plain = engram.combine(hidden, fetched)
    build_quantize_converter(section(engram=True)).convert(model)
    assert isinstance(engram.kv_matmul, Float8EngramMatmul)
    converted = engram.combine(hidden, fetched)
    assert 1e-4 < _relative(converted.detach(), plain.detach()) < 0.2


@pytest.mark.parametrize("flavor", ["debug", "debug-v3", "debug-v41"])
def test_the_conversion_list(flavor, caplog):
    """Attention projections and dense/shared-expert MLPs convert; the LM head, router gates,
    hyper-connection mixers, Engram projections and tables stay; odd widths and filtered names
    are listed."""
    args = resolve_model_args(flavor)
    with torch.device("meta"):
        model = Transformer(args)
    dense = {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and any(f".{kind}." in name for kind in ("attention", "feed_forward", "shared_experts"))
    }
    odd = sorted(n for n, m in dense.items() if m.in_features % 16 or m.out_features % 16)
    want = sorted(set(dense) - set(odd))
    untouched = {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name not in want
    }
    assert any(name.endswith("router.gate") for name in untouched) or args.moe is None
    assert "output" in untouched
    filtered = want[0]
    with caplog.at_level(logging.INFO, logger="models.quantize"):
        converter = build_quantize_converter(section(filter_fqns=[filtered]))
        converter.convert(model)
    converted = sorted(n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear")
    assert converted == [n for n in want if n != filtered] == sorted(converter.plan.linears)
    assert converter.plan.skipped[filtered] == "quantize.linear.float8.filter_fqns"
    assert all("not a multiple of 16" in converter.plan.skipped[name] for name in odd)
    assert bool(odd) == (flavor == "debug-v3")  # MLA's 32 + 8 latent and rope widths
    for name in untouched:
        assert type(model.get_submodule(name)) is nn.Linear, name
    for engram in (m for m in model.modules() if type(m).__name__ == "Engram"):
        assert engram.kv_matmul is torch.nn.functional.linear
    assert f"{filtered} stays in high precision" in caplog.text
    assert f"FP8: {len(converted)} linears" in caplog.text


def test_odd_widths_are_skipped_and_listed():
    args = dataclasses.replace(tiny(), ffn_hidden_dim=40)  # a 32 x 40 MLP: no FP8 GEMM
    with torch.device("meta"):
        model = Transformer(args)
    plan = float8_plan(model)
    ffn = [n for n in plan.skipped if "feed_forward" in n]
    assert sorted(ffn) == [f"layers.0.feed_forward.w{i}" for i in (1, 2, 3)]
    assert "not a multiple of 16" in plan.skipped[ffn[0]]
    assert not any("feed_forward" in n for n in plan.linears)
    assert any("attention" in n for n in plan.linears)
    args.engram.n_embed_per_ngram = 6  # rows of 2 x 6: a 12-wide Engram GEMM
    with torch.device("meta"):
        model = Transformer(args)
    plan = float8_plan(model, engram=True)
    assert (
        plan.engram == [] and "(12, 32) is not a multiple of 16" in plan.skipped["layers.0.engram"]
    )


def test_grouped_gemm_on_cpu_stays_in_high_precision_said_once(caplog):
    q = section()
    q.grouped_mm.enable = True
    with torch.device("meta"):
        model = Transformer(tiny())
    with caplog.at_level(logging.INFO, logger="models.quantize"):
        converter = build_quantize_converter(q)
        converter.convert(model)
    assert converter.plan.experts == []
    assert caplog.text.count("routed experts stay in high precision") == 1
    experts = [m for m in model.modules() if type(m).__name__ == "GroupedExperts"]
    assert experts and all(type(p) is nn.Parameter for e in experts for p in e.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--quantize.linear.float8.enable_fsdp_float8_all_gather=true"],
            "needs recipe_name='tensorwise'",
        ),
        (
            ["--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp=true"],
            "needs enable_fsdp_float8_all_gather=true",
        ),
        (
            [
                "--quantize.linear.float8.recipe_name=tensorwise",
                "--quantize.linear.float8.enable_fsdp_float8_all_gather=true",
                "--training.device=cpu",
            ],
            "gloo cannot send float8 tensors",
        ),
        (["--quantize.engram=true"], "needs quantize.linear.float8.enable=true"),
        (["--quantize.grouped_mm.enable=true"], "needs quantize.linear.float8.enable=true"),
        (["--quantize.linear.float8.recipe_name=e5m2"], "use 'tensorwise' or 'rowwise'"),
        (["--quantize.linear.fp8.enable=true"], "unknown config table [quantize.linear.fp8]"),
    ],
)
def test_bad_quantize_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError) as error:
        load_config("pretrain/configs/debug.toml", overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_engram_tables_under_fp8_stay_as_close_as_bf16s(monkeypatch):
    """50 steps of the real step with the linears and the Engram GEMM in FP8 (rowwise): the
    table rows and their row-wise Adam moments end within twice the distance from the float32
    run that BF16 autocast itself ends at, while the Engram GEMM ran through the float8 product
    every step. (That the rows' gradient is the high-precision one is checked exactly above.)"""
    from parallel.plan import ParallelPlan
    from pretrain.config import OptimizerConfig
    from pretrain.optimizer import Optimizers
    from pretrain.step import StepModel
    from tests.distributed.parity import ROWS, initial_model, model_args, train

    calls = []
    original = Float8EngramMatmul.__call__

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(Float8EngramMatmul, "__call__", counted)

    def run(precision: str):
        model = initial_model(model_args(sparse=True, attention="gqa"))
        if precision == "fp8":
            build_quantize_converter(section(engram=True)).convert(model)
        opts = Optimizers(model, OptimizerConfig(lr=1e-3))
        autocast = "bf16" if precision == "bf16" else "none"
        sm = StepModel(model, model, ParallelPlan(), None, autocast)
        train(sm, opts, slice(0, ROWS), steps=50)
        (table,) = opts.sparse_tables
        state = opts.optimizers[-1].state[table]
        return {"rows": table.detach().clone(), **{k: v for k, v in state.items() if v.dim()}}

    fp32, bf16, fp8 = run("fp32"), run("bf16"), run("fp8")
    assert len(calls) == 50  # one Engram layer, every step's forward
    assert sorted(fp8) == ["exp_avg", "exp_avg_sq", "rows"]
    for key in fp32:
        reach = _relative(bf16[key], fp32[key])
        assert 0 < _relative(fp8[key], fp32[key]) < 2 * reach, key


INDUCTOR = pytest.param(  # the GPU machine's 16 cores compile it in seconds
    "inductor",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="run with the GPU tests"),
    ],
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_fp8_composes_with_activation_checkpointing_and_compiled_blocks(backend, monkeypatch):
    """FP8 linears and Engram GEMM, every block recomputed in backward and compiled: the loss
    and the gradients of the converted weights match FP8 in eager mode. In the CPU suite dynamo
    and AOT autograd trace torchao's float8 tensors and autograd functions (``aot_eager``);
    inductor's code generation, minutes on a cold CPU cache, passed the same bounds when run
    here (2026-12-07, 123 s) and runs with the GPU tests. (A recomputed block re-quantises the
    same activations; inductor's reordering moves values across a float8 rounding boundary here
    and there, hence the 1e-3 bounds.)"""
    import copy

    from parallel.wrappers import apply_block_wrappers

    compile_module = nn.Module.compile
    monkeypatch.setattr(
        nn.Module, "compile", lambda self, **kw: compile_module(self, backend=backend, **kw)
    )
    # one block: the Engram layer with its dense MLP (one compilation, as every block is alike)
    args = resolve_model_args("debug", {"num_layers": 1}, vocab_size=512)
    torch.manual_seed(0)
    eager = Transformer(args)
    eager.init_weights()
    build_quantize_converter(section(engram=True)).convert(eager)
    compiled = copy.deepcopy(eager)
    apply_block_wrappers(compiled.layers, "full", compile_blocks=True)
    tokens = torch.randint(0, 512, (2, 32))
    engram = {
        layer: torch.randint(0, 50, (2, 32, args.engram.num_heads))
        for layer in args.engram.layer_ids
    }
    losses, grads = [], []
    for model in (eager, compiled):
        loss = model(tokens, engram=engram).logits.float().square().mean()
        loss.backward()
        losses.append(loss.item())
        grads.append(
            {
                n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): p.grad
                for n, p in model.named_parameters()
                if "attention." in n
            }
        )
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert grads[0] and set(grads[0]) == set(grads[1])
    for name, want in grads[0].items():
        assert _relative(grads[1][name], want) < 1e-3, name


def test_padded_expert_groups_compute_what_the_unpadded_ones_do():
    """FP8 grouped GEMMs need each expert's rows to start at a multiple of 16: the experts pad
    their groups with zero rows on the device and drop them after. Output and gradients equal
    the unpadded GEMMs', and the token counts (the router's loads) are left as they were."""
    from models.moe import GroupedExperts, padded_groups

    torch.manual_seed(0)
    experts = [GroupedExperts(16, 32, 4) for _ in range(2)]
    experts[0].init_weights(0.02, 0.02)
    experts[1].load_state_dict(experts[0].state_dict())
    experts[1].group_multiple = 16
    counts = torch.tensor([5, 0, 17, 3])
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    outs = []
    for module in experts:
        out = module(x, counts)
        out.square().sum().backward()
        outs.append((out.detach(), x.grad.clone(), module.w1.grad.clone()))
        x.grad = None
    for plain, padded in zip(*outs):
        torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-7)
    assert counts.tolist() == [5, 0, 17, 3]
    rows, offs = padded_groups(counts, 16, 25)
    assert offs.tolist() == [16, 16, 48, 64]
    assert rows.tolist() == [*range(5), *range(16, 33), *range(48, 51)]
