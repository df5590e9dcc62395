"""Pipeline parallelism with ``torch.distributed.pipelining``: GPipe, 1F1B and interleaved 1F1B.

The model family splits itself into stages (``models.parallel_plans.split_pipeline``); this module
wraps each stage so it returns one tensor, and builds the schedule. Every rank of a pipeline gets
the same batch from its loader, so extra inputs (hash ids, positions, document ids) are passed as
per-microbatch keyword arguments to each stage rather than sent between stages.
"""

from __future__ import annotations

import torch
from torch import nn

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, as even as possible; a ``ValueError`` if a stage would have no layer."""
    if num_stages > num_layers:
        raise ValueError(
            f"{num_stages} pipeline stages for {num_layers} layers: some stages would "
            "have no layers; lower parallelism.pipeline_parallel_degree or "
            "parallelism.pipeline_stages_per_rank"
        )
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for stage in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


def stages_of_rank(pp_rank: int, pp_degree: int, stages_per_rank: int) -> list[int]:
    """Looped assignment (stage ``pp_rank + k * pp``), as the interleaved schedule expects."""
    return [pp_rank + k * pp_degree for k in range(stages_per_rank)]


class StageOutput(nn.Module):
    """Runs a stage model and returns a tensor: the streams, or the logits on the last stage."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x, **kwargs):
        return self.stage(x, **kwargs).logits


def build_schedule(
    stage_models: list[nn.Module],
    stage_ids: list[int],
    num_stages: int,
    pp_group,
    device,
    name: str,
    n_microbatches: int,
    loss_fn,
):
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    if name not in SCHEDULES:
        raise ValueError(f"parallelism.pipeline_schedule={name!r}: use one of {SCHEDULES}")
    stages = [
        PipelineStage(StageOutput(m), s, num_stages, torch.device(device), group=pp_group)
        for m, s in zip(stage_models, stage_ids)
    ]
    if name == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn)
    if len(stages) != 1:
        raise ValueError(
            f"parallelism.pipeline_schedule={name!r} runs one stage per rank: set "
            "parallelism.pipeline_stages_per_rank=1 or use 'interleaved_1f1b'"
        )
    cls = ScheduleGPipe if name == "gpipe" else Schedule1F1B
    return cls(stages[0], n_microbatches, loss_fn=loss_fn)
