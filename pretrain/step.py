"""The training step, shared by the trainer, evaluation and every parity test.

``forward_backward`` runs one microbatch (through the pipeline schedule when pipelining) and
``optimizer_step`` finishes the step: the gradient synchronisation DDP/FSDP do not do, the global
norm and clipping, the optimizer update, and the MoE load reduction plus the auxiliary-loss-free
bias update. Nothing here knows the layout beyond what ``ParallelPlan`` says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data.batch import Batch
from parallel.distributed import all_reduce_sum_
from parallel.engram_table_parallel import exchange_lookup_counts
from parallel.plan import ParallelPlan
from parallel.tensor_parallel import vocab_parallel_loss
from pretrain.optimizer import Optimizers, clip_grad_norm


@dataclass
class StepModel:
    """A parallelised model and what a step needs to drive it.

    Args:
        model: what to call (DDP/FSDP-wrapped, or the plain model).
        inner: the plain model underneath (``moe_layers()``, ``engram_layers()``).
        plan: the ``ParallelPlan`` from ``parallelize_<family>()``.
        pipeline: a ``PipelineRunner`` under pipeline parallelism.
        mixed_precision: "none" or "bf16" (autocast).
    """

    model: nn.Module
    inner: nn.Module
    plan: ParallelPlan
    pipeline: object = None
    mixed_precision: str = "none"

    def autocast(self, device: torch.device):
        if self.mixed_precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def lookup_planners(inner: nn.Module) -> dict:
    """``{layer: planner}`` of this rank's Engram tables that plan their lookups in the loader."""
    planners = {e.layer_id: e.table.planner() for e in inner.engram_layers()}
    return {layer: p for layer, p in planners.items() if p is not None}


@dataclass
class MicroLoss:
    ce: torch.Tensor  # detached mean cross-entropy of the microbatch
    aux: dict[str, torch.Tensor]  # detached auxiliary losses


def forward_loss(sm: StepModel, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy and auxiliary losses of a batch already on the device (no backward)."""
    batch = exchange_lookup_counts(sm.inner, batch)
    with sm.autocast(batch.tokens.device):
        if sm.pipeline is not None:
            return sm.pipeline.evaluate(batch), {}
        out = sm.model(
            batch.tokens, positions=batch.positions, doc_ids=batch.doc_ids, engram=batch.engram
        )
    with vocab_parallel_loss(sm.plan.vocab_parallel):
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), batch.labels.flatten())
    if hasattr(ce, "to_local"):  # a replicated DTensor from the vocab-parallel loss
        ce = ce.to_local()
    return ce, out.aux_losses


@torch.no_grad()
def token_logprobs(sm: StepModel, batch: Batch) -> torch.Tensor:
    """``log p(label_t | tokens_<=t)`` ``[B, T]`` (float32, on the batch's device) of a batch
    already on the device: the per-token loss, negated (under pipeline parallelism through the
    schedule, the same on every stage)."""
    batch = exchange_lookup_counts(sm.inner, batch)
    with sm.autocast(batch.tokens.device):
        if sm.pipeline is not None:
            return -sm.pipeline.token_losses(batch).to(batch.tokens.device)
        out = sm.model(
            batch.tokens, positions=batch.positions, doc_ids=batch.doc_ids, engram=batch.engram
        )
    with vocab_parallel_loss(sm.plan.vocab_parallel):
        ce = F.cross_entropy(
            out.logits.float().flatten(0, 1), batch.labels.flatten(), reduction="none"
        )
    if hasattr(ce, "full_tensor"):  # a DTensor from the vocab-parallel loss
        ce = ce.full_tensor()
    return -ce.view(batch.labels.shape)


def forward_backward(
    sm: StepModel, batch: Batch, *, scale: float = 1.0, sync: bool = True
) -> MicroLoss:
    """Forward and backward of one microbatch, its loss scaled by ``scale`` (1 / accumulation).

    ``sync=False`` (an accumulation microbatch that is not the last) skips DDP's gradient
    all-reduce, and FSDP's reduce-scatter and post-backward reshard: gradients accumulate
    unsharded until the last microbatch. With ``sync=True`` the plan's own reductions (expert
    shards' replicas) start during the backward, as each gradient is final. Under pipeline
    parallelism the schedule runs the microbatches and ``scale`` is the runner's own.
    """
    batch = exchange_lookup_counts(sm.inner, batch)  # once for every layer and recompute
    if sm.pipeline is not None:
        with sm.autocast(batch.tokens.device):
            return MicroLoss(sm.pipeline.train(batch).to(batch.tokens.device), {})
    if hasattr(sm.model, "set_requires_gradient_sync"):  # FSDP2
        sm.model.set_requires_gradient_sync(sync)
        sm.model.set_reshard_after_backward(sync)
    no_sync = not sync and hasattr(sm.model, "no_sync")
    with sm.model.no_sync() if no_sync else contextlib.nullcontext():
        ce, aux = forward_loss(sm, batch)
        loss = ce + sum(aux.values()) if aux else ce
        with vocab_parallel_loss(sm.plan.vocab_parallel), sm.plan.overlap_grad_sync(sync):
            (loss * scale).backward()
    return MicroLoss(ce.detach(), {k: v.detach() for k, v in aux.items()})


def optimizer_step(
    sm: StepModel,
    optimizers: Optimizers,
    max_norm: float,
    inspect: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Synchronise, clip, update, rebalance; returns the global gradient norm (before clipping).

    ``inspect(grad_norm)`` runs after the gradients are final and clipped, before the update
    (parity tests read the gradients there). Under fault tolerance (``plan.replicas``) the
    gradients and MoE loads are averaged over the live replica groups too, and the update runs
    only when the step commits (``plan.replicas.committed``); otherwise it is dropped.
    """
    plan = sm.plan
    plan.sync_grads()
    if plan.replicas is not None:
        plan.replicas.average_grads_(sm.model.parameters(), optimizers.sparse_tables)
    grad_norm = clip_grad_norm(
        list(sm.model.parameters()), max_norm, plan.sharded_groups, plan.pp_cpu_group
    )
    if inspect is not None:
        inspect(grad_norm)
    reduce_moe_loads(sm)
    if plan.replicas is not None and not plan.replicas.commit():
        optimizers.skip_step()
        for moe in sm.inner.moe_layers():
            moe.router.tokens_per_expert.zero_()
        return grad_norm
    optimizers.step()
    optimizers.zero_grad()
    for moe in sm.inner.moe_layers():
        moe.router.update_bias()
    return grad_norm


@torch.no_grad()
def reduce_moe_loads(sm: StepModel) -> None:
    """Sum every router's token counts over the data-parallel ranks, the sequence shards and
    the live replica groups, for the auxiliary-loss-free bias step."""
    for moe in sm.inner.moe_layers():
        all_reduce_sum_(moe.router.tokens_per_expert, sm.plan.dp_group)
        for group in sm.plan.token_groups:
            all_reduce_sum_(moe.router.tokens_per_expert, group)
        if sm.plan.replicas is not None:
            sm.plan.replicas.sum_(moe.router.tokens_per_expert)
