"""Backbone unit tests: shapes, masking, MoE, mHC, MLA, training signal, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data.ngram_hash import EngramHashSpec
from models.args import EngramConfig, ModelArgs, MoEArgs
from models.attention import MLAttention
from models.hyper_connections import HyperConnection, sinkhorn
from models.layers import (
    RotaryEmbedding,
    apply_rotary,
    attention_mask,
    doc_ids_from_positions,
    resolve_attention_backend,
)
from models.moe import MoE
from models.transformer import build_model


def tiny(attention="gqa", hc=1, moe=True, engram=True, **kw) -> ModelArgs:
    return ModelArgs(
        vocab_size=97,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        attention=attention,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        ffn_hidden_dim=64,
        hc_mult=hc,
        max_seq_len=32,
        moe=MoEArgs(num_routed_experts=4, top_k=2, expert_hidden_dim=16) if moe else None,
        engram=EngramConfig(
            hash=EngramHashSpec(layer_ids=[0], engram_vocab_size=[53, 59], n_head_per_ngram=2),
            n_embed_per_ngram=8,
        )
        if engram
        else None,
        **kw,
    )


def _hash_ids(batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {0: torch.randint(0, 50, (batch, seq, 4), generator=g)}


@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("hc", [1, 4])
def test_shapes_and_backward(attention, hc):
    model = build_model(tiny(attention, hc))
    out = model(torch.randint(0, 97, (2, 12)), engram=_hash_ids(2, 12))
    assert out.logits.shape == (2, 12, 97)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_causal_and_document_masks(attention):
    model = build_model(tiny(attention, hc=2, engram=False))
    tokens = torch.randint(0, 97, (1, 16))
    base = model(tokens).logits
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    torch.testing.assert_close(model(changed).logits[:, :10], base[:, :10])  # causal
    positions = torch.cat([torch.arange(6), torch.arange(10)]).unsqueeze(0)
    doc = model(tokens, positions=positions).logits
    changed = tokens.clone()
    changed[0, :6] = (changed[0, :6] + 1) % 97  # first document changes
    torch.testing.assert_close(model(changed, positions=positions).logits[:, 6:], doc[:, 6:])
    assert not torch.allclose(model(changed).logits[:, 6:], base[:, 6:])  # no mask: leaks


def test_moe_matches_dense_loop():
    torch.manual_seed(0)
    args = MoEArgs(
        num_routed_experts=5,
        num_shared_experts=1,
        top_k=2,
        expert_hidden_dim=8,
        use_grouped_mm=False,
    )
    moe = MoE(16, args)
    moe.init_weights(0.1, 0.1)
    moe.router.expert_bias.copy_(torch.randn(5) * 0.1)
    x = torch.randn(2, 7, 16)
    out, _ = moe(x)
    flat = x.reshape(-1, 16)
    scores = torch.sigmoid(flat @ moe.router.gate.weight.T)
    expected = moe.shared_experts(flat)
    for t in range(flat.shape[0]):
        chosen = (scores[t] + moe.router.expert_bias).topk(2).indices
        weights = scores[t, chosen] / scores[t, chosen].sum()
        for w, e in zip(weights, chosen):
            h = F.silu(flat[t] @ moe.experts.w1[e]) * (flat[t] @ moe.experts.w3[e])
            expected[t] += w * (h @ moe.experts.w2[e])
    torch.testing.assert_close(out.reshape(-1, 16), expected, rtol=1e-5, atol=1e-6)
    # only training forwards count toward the balancing bias: an evaluation in between must not
    # change the next update (a resumed run, which skips that evaluation, would diverge)
    assert moe.router.tokens_per_expert.sum() == 2 * 7 * 2
    moe.eval()
    moe(x)
    assert moe.router.tokens_per_expert.sum() == 2 * 7 * 2


def test_grouped_mm_equals_loop():
    torch.manual_seed(0)
    moe = MoE(16, MoEArgs(num_routed_experts=4, top_k=2, expert_hidden_dim=8))
    moe.init_weights(0.1, 0.1)
    x = torch.randn(20, 16, requires_grad=True)
    counts = torch.tensor([5, 0, 9, 6])
    grouped = moe.experts(x, counts)
    loop = moe.experts.forward_loop(x, counts)
    torch.testing.assert_close(grouped, loop)
    g = torch.randn_like(grouped)
    gx1, gw1 = torch.autograd.grad((grouped * g).sum(), (x, moe.experts.w1))
    gx2, gw2 = torch.autograd.grad((loop * g).sum(), (x, moe.experts.w1))
    torch.testing.assert_close(gx1, gx2)
    torch.testing.assert_close(gw1, gw2)


def test_aux_free_bias_update_moves_toward_balance():
    moe = MoE(8, MoEArgs(num_routed_experts=4, top_k=1, expert_hidden_dim=8, bias_update_speed=0.1))
    moe.init_weights(0.1, 0.1)
    moe.router.tokens_per_expert.copy_(torch.tensor([10.0, 0.0, 3.0, 3.0]))
    moe.router.update_bias()
    assert moe.router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    assert moe.router.tokens_per_expert.sum() == 0


def test_seq_aux_loss_is_added():
    model = build_model(tiny(moe=True, engram=False))
    model.moe_layers()[0].args.seq_aux_loss_coef = 0.01
    out = model(torch.randint(0, 97, (2, 8)))
    assert out.aux_losses["moe_seq_aux"] > 0


def test_sinkhorn_doubly_stochastic():
    torch.manual_seed(0)
    m = sinkhorn(torch.randn(3, 4, 4) * 3, num_iters=100)
    torch.testing.assert_close(m.sum(-1), torch.ones(3, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(m.sum(-2), torch.ones(3, 4), atol=1e-4, rtol=0)
    assert (m >= 0).all()


def test_hc_mult_one_is_plain_residual():
    hc = HyperConnection(16, 1)
    assert not list(hc.parameters())
    x = torch.randn(2, 5, 1, 16)
    h, ctx = hc.pre(x)
    out = torch.randn(2, 5, 16)
    torch.testing.assert_close(h, x[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(hc.post(x, out, ctx), x + out.unsqueeze(2), rtol=0, atol=0)


def _naive_mla(attn: MLAttention, x, cos, sin):
    """Straightforward MLA: per head, explicit softmax, no fused kernels."""
    batch, seq, _ = x.shape
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(batch, seq, attn.num_heads, -1)
    ckv = attn.wkv_a(x)
    c, k_pe = ckv[..., : attn.kv_lora_rank], ckv[..., attn.kv_lora_rank :]
    kv = attn.wkv_b(attn.kv_norm(c)).view(batch, seq, attn.num_heads, -1)
    k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin)[:, :, 0]
    outs = []
    for h in range(attn.num_heads):
        qn, qp = q[:, :, h, : attn.nope_dim], q[:, :, h, attn.nope_dim :]
        qp = apply_rotary(qp.unsqueeze(2), cos, sin)[:, :, 0]
        kn, v = kv[:, :, h, : attn.nope_dim], kv[:, :, h, attn.nope_dim :]
        scores = (qn @ kn.transpose(1, 2) + qp @ k_pe.transpose(1, 2)) * attn.scale
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), -math.inf)
        outs.append(scores.softmax(-1) @ v)
    return attn.wo(torch.cat(outs, dim=-1))


def test_mla_matches_naive_reference():
    torch.manual_seed(0)
    args = tiny("mla")
    attn = MLAttention(args)
    attn.init_weights(0.1, 0.1)
    rope = RotaryEmbedding(args.qk_rope_head_dim, 32, 10000.0, args.yarn)
    rope.init_weights()
    x = torch.randn(2, 10, 32)
    cos, sin = rope(torch.arange(10).expand(2, 10))
    torch.testing.assert_close(attn(x, (cos, sin), None), _naive_mla(attn, x, cos, sin))


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=pytest.mark.slow) for k in ("dense", "moe")] + ["engram-moe"]
)
def test_loss_falls_on_tiny_data(kind):
    torch.manual_seed(0)
    args = tiny("mla", hc=2, moe=kind != "dense", engram=kind == "engram-moe")
    model = build_model(args)
    dense = [p for n, p in model.named_parameters() if "table" not in n]
    tables = [p for n, p in model.named_parameters() if "table" in n]
    opt = torch.optim.AdamW(dense, lr=3e-3)
    from pretrain.rowwise_adam import RowwiseAdam

    table_opt = RowwiseAdam(tables, lr=1.5e-2) if tables else None
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 97, (4, 17), generator=g)
    hash_ids = _hash_ids(4, 16)
    losses = []
    for _ in range(200):
        out = model(data[:, :-1], engram=hash_ids)
        loss = F.cross_entropy(out.logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        if table_opt:
            table_opt.zero_grad()
        loss.backward()
        opt.step()
        if table_opt:
            table_opt.step()
        model.update_moe_biases()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(moe=MoEArgs(num_routed_experts=4, top_k=5)), "top_k"),
        (
            dict(engram=EngramConfig(EngramHashSpec(layer_ids=[7], engram_vocab_size=[53, 59]))),
            "engram.hash.layer_ids",
        ),
        (dict(attention="mha"), "model.attention"),
        (dict(hc_mult=0), "hc_mult"),
    ],
)
def test_validation_names_the_field(override, field):
    args = tiny()
    for key, value in override.items():
        setattr(args, key, value)
    with pytest.raises(ValueError, match=field):
        args.validate()


def test_yarn_changes_low_frequencies_only():
    from models.args import YarnArgs
    from models.layers import rope_inv_freq

    base = rope_inv_freq(64, 10000.0, YarnArgs())
    scaled = rope_inv_freq(64, 10000.0, YarnArgs(factor=8, original_max_position_embeddings=4096))
    assert torch.allclose(scaled[:8], base[:8])  # fast dims kept
    torch.testing.assert_close(scaled[-1], base[-1] / 8)  # slow dims interpolated


@pytest.mark.parametrize("planned", [False, True], ids=["hash_ids", "planned"])
def test_activation_checkpointing_matches_plain(planned):
    """Recomputed blocks give the plain gradients, and the Engram rows are looked up once,
    before the recomputed region (bare hash ids, or the loader's inputs with a plan and the
    step row buffer): the recompute does not look up again."""
    from data.batch import EngramInputs
    from parallel.wrappers import apply_block_wrappers

    args = tiny("mla", hc=2)
    tokens, hash_ids = torch.randint(0, 97, (2, 12)), _hash_ids(2, 12)
    grads = []
    for mode in ("none", "full"):
        model = build_model(args)
        table = model.layers["0"].engram.table
        if planned:
            plan = table.planner()(hash_ids[0].numpy()).to_torch()
            inputs = {0: EngramInputs(hash_ids[0], plan)}
        else:
            inputs = hash_ids
        lookups = []
        table.register_forward_hook(lambda *_, seen=lookups: seen.append(1))
        apply_block_wrappers(model.layers, mode, compile_blocks=False)
        model(tokens, engram=inputs).logits.square().mean().backward()
        assert len(lookups) == 1, mode
        grads.append(
            {
                n.replace("._checkpoint_wrapped_module", ""): p.grad.to_dense()
                for n, p in model.named_parameters()
            }
        )
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_flex_attention_matches_dense_mask(attention):
    """The flex_attention block mask (what CUDA runs) gives the dense-mask SDPA outputs: causal
    within documents, grouped kv heads read in place. CPU flex has no backward: forward only."""
    args = tiny(attention, hc=2)
    model = build_model(args)
    tokens = torch.randint(0, 97, (2, 16))
    positions = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, 16)
    engram = _hash_ids(2, 16)
    with torch.no_grad():
        dense = model(tokens, positions=positions, engram=engram).logits
        model.args.attention_backend = "flex"
        flex = model(tokens, positions=positions, engram=engram).logits
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    doc_ids = doc_ids_from_positions(positions)
    mask = attention_mask(doc_ids, "flex")
    assert mask.dense is None and mask.block is not None
    assert resolve_attention_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_attention_backend("auto", torch.device("cpu")) == "sdpa"


def test_group_limited_routing_keeps_experts_in_the_best_groups():
    from models.args import MoEArgs
    from models.moe import Router

    args = MoEArgs(num_routed_experts=8, top_k=3, n_group=4, topk_group=2)
    router = Router(16, args)
    router.init_weights(0.5)
    x = torch.randn(64, 16)
    topk_idx, _, scores = router(x)
    groups = topk_idx // 2  # 4 groups of 2 experts
    best = scores.view(64, 4, 2).sum(-1).topk(2, dim=-1).indices  # top-2 sums = whole group
    for row in range(64):
        assert set(groups[row].tolist()) <= set(best[row].tolist())
    with pytest.raises(ValueError, match="n_group"):
        from models.flavors import get_flavor

        bad = get_flavor("debug-v3")
        bad.moe.n_group = 3  # does not divide 8 experts
        bad.validate()


def test_context_parallel_masks_flex_and_dense_match_full_attention():
    """The context-parallel mask (local queries at their global indices against the whole
    sequence's keys) gives the rows of full-sequence attention, as a dense SDPA mask and as the
    flex block mask CUDA runs (CPU flex: forward only). Keys arrive whole here: the sequence's
    gather is the identity, which is what ``ContextParallelSequence.gather`` returns in order."""
    from data.batch import zigzag_index
    from models.attention import attend
    from models.layers import _mask
    from models.sequence import LocalSequence

    class WholeKeys(LocalSequence):
        degree = 2

        def gather(self, x, dim=1):  # the keys and values arrive whole already
            return x

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 32, 4, 8, generator=g) for _ in range(3))
    positions = torch.cat([torch.arange(11), torch.arange(21)]).expand(2, 32)
    docs = doc_ids_from_positions(positions)
    full = attend(q, k, v, attention_mask(docs, "sdpa"), 8**-0.5)
    for rank in range(2):
        index = torch.from_numpy(zigzag_index(32, 2, rank))
        for backend in ("sdpa", "flex"):
            mask = _mask(docs[:, index], docs, index, backend, WholeKeys())
            out = attend(q[:, index], k, v, mask, 8**-0.5)
            torch.testing.assert_close(out, full[:, index], rtol=1e-5, atol=1e-5)
