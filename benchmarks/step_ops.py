"""Aten ops one training step dispatches at a dense shape: forward, backward, gradient-norm clip
and AdamW step, each counted apart (each op is at least one kernel launch on a GPU).

The shape is a dense GQA transformer (no MoE, no Engram, one residual stream): ``--layers``
blocks of width 256, 4 heads of 64 (2 KV heads), SwiGLU 704, vocabulary 4096, batch 2 x 128,
float32, AdamW with the fused kernel a GPU runs (``Optimizers(cuda=True)``; the CPU has one too)
and the global norm clip at 1.0. The op count does not depend on the widths, only on the
structure.

``--peer`` counts OLMo-core's step at the same shape beside ours (its ``llama_like``
transformer, its loss, the norm and clip of its train module, torch's fused AdamW); it needs
``pip install ai2-olmo-core==3.0.0``, which the project does not depend on.

Run: .venv/bin/python -m benchmarks.step_ops [--layers 4] [--peer] [--top 12]
Prints ``aten_ops_step: N`` (and ``aten_ops_step_peer: M``) last.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from benchmarks.common import print_table
from benchmarks.engram_layer import OpCounter

WIDTH, HEADS, KV_HEADS, FFN, VOCAB, BATCH, SEQ = 256, 4, 2, 704, 4096, 2, 128


def dense_step(layers: int = 4):
    """The model, its optimizers and one step's phases as closures (real ``pretrain.step``)."""
    from data.batch import Batch
    from models.args import ModelArgs
    from models.transformer import Transformer
    from parallel.plan import ParallelPlan
    from pretrain.config import OptimizerConfig
    from pretrain.optimizer import Optimizers, clip_grad_norm
    from pretrain.step import StepModel, forward_loss

    args = ModelArgs(
        vocab_size=VOCAB,
        dim=WIDTH,
        num_layers=layers,
        num_dense_layers=layers,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=WIDTH // HEADS,
        attention="gqa",
        ffn_hidden_dim=FFN,
        hc_mult=1,
        max_seq_len=SEQ,
        moe=None,
        engram=None,
    )
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    sm = StepModel(model, model, ParallelPlan())
    optimizers = Optimizers(model, OptimizerConfig(), cuda=True)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    doc_ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
    batch = Batch(tokens[:, :-1], tokens[:, 1:], positions, doc_ids)
    state = {}

    def forward():
        state["loss"] = forward_loss(sm, batch)[0]

    def backward():
        state["loss"].backward()

    def clip():
        clip_grad_norm(list(model.parameters()), 1.0)

    def update():
        optimizers.step()
        optimizers.zero_grad()

    return {"forward": forward, "backward": backward, "clip": clip, "optimizer": update}


def peer_step(layers: int = 4):
    """OLMo-core 3.0.0's step at the same shape, as its train module runs it on one process."""
    from olmo_core.nn.feed_forward import FeedForwardConfig
    from olmo_core.nn.transformer import TransformerConfig

    cfg = TransformerConfig.llama_like(
        d_model=WIDTH,
        vocab_size=VOCAB,
        n_layers=layers,
        n_heads=HEADS,
        n_kv_heads=KV_HEADS,
        feed_forward=FeedForwardConfig(hidden_size=FFN, bias=False),
    )
    torch.manual_seed(0)
    model = cfg.build(init_device="cpu")
    model.init_weights(device=torch.device("cpu"))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    state = {}

    def forward():
        state["loss"] = model(tokens[:, :-1], labels=tokens[:, 1:]).loss

    def backward():
        state["loss"].backward()

    def clip():  # TransformerTrainModule._clip_grad_norm without FSDP
        params = list(model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, total)

    def update():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"forward": forward, "backward": backward, "clip": clip, "optimizer": update}


def count_step(phases: dict) -> dict[str, Counter]:
    for run in phases.values():  # warm: lazy state (Adam moments) is not the steady state
        run()
    counts = {}
    for name, run in phases.items():
        with OpCounter() as counter:
            run()
        counts[name] = counter.ops
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--peer", action="store_true", help="count OLMo-core's step beside ours")
    parser.add_argument("--top", type=int, default=12, help="most frequent ops to list")
    ns = parser.parse_args(argv)
    torch.set_num_threads(1)
    arms = {"ours": count_step(dense_step(ns.layers))}
    if ns.peer:
        arms["OLMo-core"] = count_step(peer_step(ns.layers))
    phases = list(arms["ours"])
    totals = {arm: sum(sum(c.values()) for c in counts.values()) for arm, counts in arms.items()}
    rows = [[phase, *(sum(arms[a][phase].values()) for a in arms)] for phase in phases]
    rows.append(["step", *totals.values()])
    print_table(["phase", *(f"aten ops, {arm}" for arm in arms)], rows)
    everything = sum(arms["ours"].values(), Counter())
    print("most frequent ops (ours):", dict(everything.most_common(ns.top)))
    print(f"aten_ops_step: {totals['ours']}")
    if ns.peer:
        print(f"aten_ops_step_peer: {totals['OLMo-core']}")


if __name__ == "__main__":
    main()
