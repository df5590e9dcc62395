"""Engram module beyond the reference cases: V4.1 variant, conv init, row-wise Adam."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data.ngram_hash import EngramHashSpec
from models.args import EngramConfig
from models.engram import Engram, GateMonitor
from pretrain.rowwise_adam import RowwiseAdam


def _cfg(layer_ids=(0,), **kw):
    spec = EngramHashSpec(
        layer_ids=list(layer_ids),
        engram_vocab_size=[101, 103],
        max_ngram_size=3,
        n_head_per_ngram=2,
    )
    return EngramConfig(**{"hash": spec, "n_embed_per_ngram": 16, "kernel_size": 3, **kw})


def _module(cfg, dim=24, hc=2):
    torch.manual_seed(0)
    module = Engram(cfg, 0, dim, hc, cfg.table_sizes()[0])
    module.init_weights()
    return module


def test_v41_variant_matches_direct_formula():
    cfg = _cfg(variant="v4.1")
    module = _module(cfg)
    assert not hasattr(module, "short_conv") and module.kv_proj.bias is None
    hidden = torch.randn(2, 5, 2, 24)
    ids = torch.randint(0, 100, (2, 5, 4))
    out = module(hidden, ids)
    rows = module.table(ids).flatten(-2)
    kv = rows @ module.kv_proj.weight.T
    keys, value = kv[..., :48].reshape(2, 5, 2, 24), kv[..., 48:]
    expected = []
    for i in range(2):
        k = torch.nn.functional.rms_norm(keys[:, :, i], (24,), module.key_norms[i].weight)
        q = torch.nn.functional.rms_norm(hidden[:, :, i], (24,), module.query_norms[i].weight)
        g = (k * q).sum(-1) / math.sqrt(24)
        g = torch.sigmoid(g.abs().clamp_min(1e-6).sqrt() * g.sign())
        expected.append(g.unsqueeze(-1) * value)
    torch.testing.assert_close(out, torch.stack(expected, 2))


def _v41_gates_by_hand(module, hidden, ids, dtype):
    """The V4.1 gate from the module's own (maybe bf16) keys, with every gate op in ``dtype``."""
    keys = module.kv_proj(module.table(ids).flatten(-2)).split(24, dim=-1)[:2]
    gates = []
    for i in range(2):
        kn, qn = module.key_norms[i], module.query_norms[i]
        k = F.rms_norm(keys[i].to(dtype), (24,), kn.weight.to(dtype), kn.eps)
        q = F.rms_norm(hidden[:, :, i].to(dtype), (24,), qn.weight.to(dtype), qn.eps)
        g = (k * q).sum(-1) / math.sqrt(24)
        gates.append(torch.sigmoid(g.abs().clamp_min(1e-6).sqrt() * g.sign()).unsqueeze(-1))
    return torch.stack(gates, 2)


def test_v41_gate_in_float32():
    """A bf16 model's V4.1 gate runs every op (norm weights included) in float32: it equals the
    float32 formula on the module's bf16 keys to float32 rounding, far tighter than the bf16 gate's
    error (which a gate computed in bf16 and cast at the end would show)."""
    module = _module(_cfg(variant="v4.1")).to(torch.bfloat16)
    hidden, ids = torch.randn(2, 16, 2, 24).bfloat16(), torch.randint(0, 100, (2, 16, 4))
    monitor = GateMonitor(module)
    with torch.no_grad():
        module(hidden, ids)
        want = _v41_gates_by_hand(module, hidden, ids, torch.float32)
        bf16 = _v41_gates_by_hand(module, hidden, ids, torch.bfloat16).float()
    got = monitor._last[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert (bf16 - want).abs().max() > 100 * (got - want).abs().max().clamp_min(1e-9)
    assert monitor.scalars()["engram/gate_mean/layer0"] == pytest.approx(want.mean().item())
    monitor.remove()
    module(hidden, ids)
    assert not monitor._last


def test_zero_conv_init_is_pure_gated_lookup():
    module = _module(_cfg(conv_init="zero"))
    assert module.short_conv.conv.weight.abs().sum() == 0
    ref_module = _module(_cfg(conv_init="reference"))
    assert ref_module.short_conv.conv.weight.abs().sum() > 0


def test_bad_config_names_field():
    with pytest.raises(ValueError, match="engram.hash.layer_ids"):
        _cfg(layer_ids=[5]).validate(num_layers=4)
    with pytest.raises(ValueError, match="n_embed_per_ngram"):
        _cfg(n_embed_per_ngram=15).validate()
    with pytest.raises(ValueError, match="engram.variant"):
        _cfg(variant="v5").validate()


def _train_table(sparse: bool, optimizer_cls, steps=4):
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 6, sparse=sparse)
    opt = optimizer_cls(table.parameters(), lr=0.1)
    for step in range(steps):
        ids = torch.randint(
            0, 50 if step else 10, (7, 3), generator=torch.Generator().manual_seed(step)
        )
        opt.zero_grad()
        (table(ids) ** 2).sum().backward()
        opt.step()
    return table.weight.detach()


def test_rowwise_adam_equals_sparse_adam():
    ours = _train_table(True, lambda p, lr: RowwiseAdam(p, lr=lr, betas=(0.9, 0.999)))
    theirs = _train_table(True, lambda p, lr: torch.optim.SparseAdam(list(p), lr=lr))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_rowwise_adam_dense_grad_equals_sparse_grad():
    sparse = _train_table(True, lambda p, lr: RowwiseAdam(p, lr=lr))
    dense = _train_table(False, lambda p, lr: RowwiseAdam(p, lr=lr))
    torch.testing.assert_close(sparse, dense)


def test_rowwise_adam_leaves_untouched_rows():
    table = torch.nn.Embedding(20, 4, sparse=True)
    before = table.weight.detach().clone()
    opt = RowwiseAdam(table.parameters(), lr=0.1)
    table(torch.tensor([3, 5, 5])).sum().backward()
    opt.step()
    changed = (table.weight.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 5]


@pytest.mark.parametrize("state", ["adam", "adam_row_v", "adagrad_row"])
def test_rows_touched_counts_the_rows_that_had_a_gradient(state):
    tables = [torch.nn.Embedding(20, 4, sparse=True), torch.nn.Embedding(30, 4, sparse=True)]
    opt = RowwiseAdam([t.weight for t in tables], lr=0.1, state=state)
    assert opt.rows_touched() == (0, 50)
    for ids in ([3, 5, 5], [7, 3]):
        opt.zero_grad()
        (tables[0](torch.tensor(ids)).sum() + tables[1](torch.tensor([29])).sum()).backward()
        opt.step()
    assert opt.rows_touched(block_rows=4) == (4, 50)  # rows 3, 5, 7 and 29


@pytest.mark.parametrize("state", ["adam_row_v", "adagrad_row"])
def test_lighter_row_states_follow_their_formulas(state):
    """One second moment per row (Adam) and row-wise Adagrad, against their textbook updates
    written row by row in float64; untouched rows keep their state."""
    lr, (b1, b2), eps = 0.1, (0.9, 0.95), 1e-8
    got = _train_table(True, lambda p, lr: RowwiseAdam(p, lr=lr, betas=(b1, b2), state=state))
    torch.manual_seed(0)
    want = torch.nn.Embedding(50, 6).weight.detach().double()
    m, v = torch.zeros_like(want), torch.zeros(50, 1, dtype=torch.float64)
    for step in range(4):
        ids = torch.randint(
            0, 50 if step else 10, (7, 3), generator=torch.Generator().manual_seed(step)
        )
        grad = torch.zeros_like(want).index_add_(0, ids.flatten(), 2 * want[ids.flatten()])
        t = step + 1
        for r in ids.unique().tolist():
            g = grad[r]
            if state == "adam_row_v":
                m[r] = b1 * m[r] + (1 - b1) * g
                v[r] = b2 * v[r] + (1 - b2) * (g * g).mean()
                size = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
                want[r] -= size * m[r] / (v[r].sqrt() + eps)
            else:
                v[r] += (g * g).mean()
                want[r] -= lr * g / (v[r].sqrt() + eps)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    table = torch.nn.Embedding(50, 6, sparse=True)
    opt = RowwiseAdam(table.parameters(), state=state)
    shapes = {k: tuple(x.shape) for k, x in opt.state[table.weight].items() if k != "step"}
    expected = {"exp_avg": (50, 6), "exp_avg_sq": (50, 1)} if state == "adam_row_v" else {}
    assert shapes == (expected or {"sum_sq": (50, 1)})


def _fused_vs_composite(variant: str, dtype=torch.float32):
    """Outputs and every gradient (hidden, rows, each parameter) of the fused dense tail and of
    the composite, on one module with non-zero conv and norm weights."""
    module = _module(_cfg(variant=variant, conv_init="reference")).to(dtype)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 16, 2, 24, generator=gen, dtype=dtype)
    rows = torch.randn(2, 16, module.cfg.embed_dim, generator=gen, dtype=dtype)
    cotangent = torch.randn(2, 16, 2, 24, generator=gen, dtype=dtype)
    results = []
    for fused in (True, False):
        module.fused = fused
        module.zero_grad(set_to_none=True)
        h, r = hidden.clone().requires_grad_(), rows.clone().requires_grad_()
        out = module.combine(h, r)
        (out * cotangent).sum().backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        results.append((out.detach(), h.grad, r.grad, grads))
    return results


@pytest.mark.parametrize("variant", ["paper", "v4.1"])
def test_fused_tail_equals_the_composite_values_and_gradients(variant):
    """The hand-written backward (models/engram_fused.py) against autograd of the composite."""
    fused, composite = _fused_vs_composite(variant)

    def close(got, want, what):  # the parity cases' measure: max error over the largest value
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-5, f"{what}: relative error {err:.3g}"

    for got, want, what in zip(fused[:3], composite[:3], ("output", "hidden", "rows")):
        close(got, want, what)
    assert fused[3].keys() == composite[3].keys() and len(fused[3]) >= 4
    for name in composite[3]:
        close(fused[3][name], composite[3][name], name)


def test_fused_tail_gradcheck():
    """Finite differences in float64 of every input of the fused function, conv included."""
    from models.engram_fused import engram_mix

    gen = torch.Generator().manual_seed(0)
    g, d, k = 2, 6, 3

    def rand(*shape, low=None):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return (t.abs() + low if low else t).requires_grad_()

    kv, hidden = rand(2, 7, (g + 1) * d), rand(2, 7, g, d)
    weights = [rand(d, low=0.5) for _ in range(3 * g)] + [rand(g * d, 1, k)]
    spec = (g, d, 1e-6, 1e-5, 2, True)
    assert torch.autograd.gradcheck(
        lambda kv, h, *w: engram_mix(kv, h, spec, *w)[0], (kv, hidden, *weights)
    )


def test_the_dense_tail_traces_as_one_graph():
    """Projections, norms, gate, value and conv are one dynamo graph: no graph break for
    ``torch.compile`` (explain only traces). The sparse table lookup before it stays eager
    (inductor cannot take sparse gradients)."""
    module = _module(_cfg(conv_init="reference"))
    hidden, rows = torch.randn(2, 16, 2, 24), torch.randn(2, 16, module.cfg.embed_dim)
    explained = torch._dynamo.explain(module.combine)(hidden, rows)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


@pytest.mark.slow
def test_a_compiled_engram_model_trains_like_the_eager_one():
    """``compile.enable``: every block compiled (inductor, CPU), the table lookup eager: the same
    loss, and the same gradients of every Engram parameter, as eager, to float32 rounding (mHC's
    Sinkhorn iterations, reordered by inductor, move the other gradients by up to ~1e-2)."""
    from models.flavors import resolve_model_args
    from models.transformer import Transformer
    from parallel.wrappers import apply_block_wrappers

    # the experts as a loop: inductor on CPU has no float32 grouped GEMM
    args = resolve_model_args("debug", {"moe.use_grouped_mm": False}, vocab_size=512)
    torch.manual_seed(0)
    import copy

    models = [Transformer(args)]
    models[0].init_weights()
    models.append(copy.deepcopy(models[0]))
    apply_block_wrappers(models[1].layers, "none", compile_blocks=True)
    tokens = torch.randint(0, 512, (2, 32))
    engram = {
        layer: torch.randint(0, 50, (2, 32, args.engram.num_heads))
        for layer in args.engram.layer_ids
    }
    grads, losses = [], []
    for model in models:
        loss = model(tokens, engram=engram).logits.float().square().mean()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if "engram" in n})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert len(grads[0]) >= 9 and all(g is not None for g in grads[1].values())
    for name, want in grads[0].items():
        got = grads[1][name]
        got, want = (g.to_dense() if g.is_sparse else g for g in (got, want))
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{name}: {err:.3g}"


def test_planned_lookups_accumulate_into_one_row_buffer_per_step():
    """Microbatches of one step, planned by the loader-side planner, add their gradients into
    one coalesced buffer over the union of their rows (grown when a microbatch brings new rows).
    It equals the sparse gradient of unplanned lookups, summed and coalesced, and the next step
    starts a new buffer."""
    from models.tables.table import EngramTable

    table = EngramTable([13, 17, 19], head_dim=4)
    torch.manual_seed(0)
    table.weight.data.normal_()
    g = torch.Generator().manual_seed(1)
    micro = [torch.randint(0, 13, (2, 5, 3), generator=g) for _ in range(3)]
    micro[2][..., 0] = 12  # a row the first two microbatches may lack: the buffer grows
    weights = [torch.randn(2, 5, 3, 4, generator=g) for _ in micro]

    planner = table.planner()
    for ids, w in zip(micro, weights, strict=True):
        plan = planner(ids.numpy()).to_torch()
        (table(ids, plan) * w).sum().backward()
    got = table.weight.grad
    assert got.is_sparse and got.is_coalesced()
    rows = torch.unique(torch.cat([table.flat_ids(ids).flatten() for ids in micro]))
    assert torch.equal(got.indices()[0], rows)  # the union, once each: nothing grew per lookup
    assert got.values().shape == (len(rows), 4)

    table.weight.grad = None
    for ids, w in zip(micro, weights, strict=True):
        (table(ids) * w).sum().backward()  # unplanned: F.embedding's sparse gradient
    want = table.weight.grad.coalesce()
    assert torch.equal(want.indices(), got.indices())
    torch.testing.assert_close(got.values(), want.values(), rtol=0, atol=1e-6)

    table.weight.grad = None  # the next step (zero_grad): a fresh buffer of its own rows
    plan = planner(micro[0].numpy()).to_torch()
    (table(micro[0], plan) * weights[0]).sum().backward()
    assert torch.equal(
        table.weight.grad.indices()[0], torch.unique(table.flat_ids(micro[0]).flatten())
    )
    # a plan of two pipeline chunks must be split with the batch before it reaches a lookup
    with pytest.raises(ValueError, match="pipeline microbatches"):
        table(micro[0], planner(micro[0].numpy(), 2).to_torch())


@pytest.mark.parametrize(
    "state",
    [
        "adam",
        pytest.param("adam_row_v", marks=pytest.mark.slow),
        pytest.param("adagrad_row", marks=pytest.mark.slow),
    ],
)
def test_fused_rowwise_update_matches_the_eager_one(state):
    """The compiled row update (gather, update, scatter in one region: CUDA's default, compiled
    for the CPU here) follows the eager one over steps with a changing learning rate, without
    recompiling. ``adam`` runs in the default set (about 20 s of compilation)."""
    from torch._dynamo.utils import counters

    def train(fused: bool):
        torch.manual_seed(0)
        table = torch.nn.Embedding(50, 8, sparse=True)
        opt = RowwiseAdam(table.parameters(), lr=0.1, state=state, fused=fused)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            opt.zero_grad()
            opt.param_groups[0]["lr"] = 0.1 / (step + 1)
            ids = torch.randint(0, 50, (3 + step, 5), generator=g)  # a new row count each step
            (table(ids) * torch.randn(3 + step, 5, 8, generator=g)).sum().backward()
            opt.step()
        return table.weight.detach(), [opt.state[table.weight][k] for k in opt.state_names]

    want = train(False)
    before = counters["stats"]["unique_graphs"]
    got = train(True)
    assert counters["stats"]["unique_graphs"] - before <= 1  # one graph for every step
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_planned_lookup_adds_to_a_gradient_it_did_not_make():
    """A table whose gradient already holds an unplanned lookup's sparse rows: planned
    lookups add to it (twice, without taking it for their own buffer), as autograd would."""
    from models.tables.table import EngramTable

    table = EngramTable([13, 17], head_dim=4)
    table.weight.data.normal_()
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 13, (2, 5, 2), generator=g) for _ in range(3)]
    weights = [torch.randn(2, 5, 2, 4, generator=g) for _ in ids]
    plans = [None, *(table.planner()(i.numpy()).to_torch() for i in ids[1:])]
    for i, w, plan in zip(ids, weights, plans, strict=True):
        (table(i, plan) * w).sum().backward()
    got = table.weight.grad.coalesce()
    table.weight.grad = None
    for i, w in zip(ids, weights, strict=True):
        (table(i) * w).sum().backward()
    want = table.weight.grad.coalesce()
    assert torch.equal(got.indices(), want.indices())
    torch.testing.assert_close(got.values(), want.values(), rtol=0, atol=1e-6)
