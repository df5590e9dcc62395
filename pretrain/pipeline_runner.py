"""Training and evaluation steps through a pipeline schedule (pipeline parallelism).

Every rank of a pipeline runs the schedule with the same batch: the first stage feeds the tokens,
the last stage computes the loss, and positions, document ids and the ``EngramInputs`` are chunked
into microbatches for every stage (each stage keeps only the inputs of its own Engram layers). The
loader plans Engram lookups per microbatch (``plan_chunks = microbatches``), so a row-sharded table
gets its host-side plan under pipelining too. The mean loss is shared over the pipeline group so
every rank logs it and stops on NaN together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.batch import Batch
from parallel.pipeline import build_schedule


class PipelineRunner:
    def __init__(self, plan, cfg, device, grad_accum_steps: int, model):
        stages = cfg.pipeline_stages_per_rank
        # the last stage gathers tensor-parallel logits, so the loss is a plain cross-entropy
        self.plan, self.model = plan, model
        self.warmed_up = False
        self.per_token = False
        self.has_first = 0 in plan.stage_ids
        self.has_last = plan.num_stages - 1 in plan.stage_ids
        self.engram_layers = {e.layer_id for s in plan.stages for e in s.engram_layers()}
        self.scale = 1.0 / grad_accum_steps
        microbatches = cfg.pipeline_microbatches or len(plan.stage_ids) * (
            plan.num_stages // stages
        )
        self.microbatches = microbatches
        self.schedule = build_schedule(
            plan.stages,
            plan.stage_ids,
            plan.num_stages,
            plan.pp_group,
            device,
            cfg.pipeline_schedule,
            microbatches,
            self._loss,
        )

    def _loss(self, logits, labels):
        if self.per_token:  # downstream scoring: every token's loss, unscaled
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()) * self.scale

    def _inputs(self, batch: Batch):
        if batch.batch_size % self.microbatches:
            raise ValueError(
                f"training.batch_size={batch.batch_size} must be divisible by "
                f"the {self.microbatches} pipeline microbatches"
            )
        kwargs = {"positions": batch.positions, "doc_ids": batch.doc_ids}
        engram = batch.only_layers(self.engram_layers).engram
        if engram:
            kwargs["engram"] = engram
        args = (batch.tokens,) if self.has_first else ()
        target = batch.labels if self.has_last else None
        return args, target, kwargs

    def warm_up(self, batch: Batch) -> None:
        """The schedule's first step infers shapes with an extra forward on real or empty inputs;
        run it once and discard what it leaves behind (gradients, MoE load counts), so training
        state depends only on the training batches (and resumes bit-identically)."""
        args, target, kwargs = self._inputs(batch)
        self.schedule.step(*args, target=target, losses=[], **kwargs)
        for param in self.model.parameters():
            param.grad = None
        for moe in self.model.moe_layers():
            moe.router.tokens_per_expert.zero_()
        self.warmed_up = True

    def train(self, batch: Batch) -> torch.Tensor:
        """Forward and backward of one batch; returns the mean loss (same on every stage)."""
        if not self.warmed_up:
            self.warm_up(batch)
        args, target, kwargs = self._inputs(batch)
        losses: list[torch.Tensor] = []
        self.schedule.step(*args, target=target, losses=losses, **kwargs)
        return self._share(losses, self.scale)

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> torch.Tensor:
        if not self.warmed_up:
            with torch.enable_grad():
                self.warm_up(batch)
        args, target, kwargs = self._inputs(batch)
        losses: list[torch.Tensor] = []
        self.schedule.eval(*args, target=target, losses=losses, **kwargs)
        return self._share(losses, self.scale)

    @torch.no_grad()
    def token_losses(self, batch: Batch) -> torch.Tensor:
        """Every token's loss ``[B, T]`` (float32, on the CPU), the same on every stage: the
        last stage computes it through the schedule and shares it over the pipeline group."""
        if not self.warmed_up:
            with torch.enable_grad():
                self.warm_up(batch)
        args, target, kwargs = self._inputs(batch)
        losses: list[torch.Tensor] = []
        self.per_token = True
        try:
            self.schedule.eval(*args, target=target, losses=losses, **kwargs)
        finally:
            self.per_token = False
        value = torch.zeros(batch.labels.shape, dtype=torch.float32)
        if self.has_last:  # one flat loss per microbatch, in order
            value += torch.cat([loss.detach().float().cpu() for loss in losses]).view_as(value)
        dist.all_reduce(value, group=self.plan.pp_cpu_group)  # only the last stage is non-zero
        return value

    def _share(self, losses, scale: float) -> torch.Tensor:
        value = torch.zeros((), dtype=torch.float64)
        if self.has_last:
            value += torch.stack([loss.detach().float().cpu() for loss in losses]).mean() / scale
        dist.all_reduce(value, group=self.plan.pp_cpu_group)  # only the last stage is non-zero
        return value.float()
