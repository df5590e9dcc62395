"""The model-agnostic contract between the trainer and a parallelised model.

``parallelize_<family>()`` returns a ``ParallelPlan`` next to the model: which gradients need a
synchronisation that DDP/FSDP do not do (sparse replicated tables, row-sharded tables, expert
shards, sequence-local parameters), which parameters hold disjoint pieces of one gradient (for the
global norm), the pipeline stages, and the groups MoE load counts are summed over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from parallel.data_parallel import all_reduce_grads_


@dataclass
class GradSyncRule:
    """After backward: sum the gradients over ``group`` (None: no communication), then divide."""

    params: list[nn.Parameter]
    group: object
    divisor: float


@dataclass
class ParallelPlan:
    rules: list[GradSyncRule] = field(default_factory=list)
    # (params whose local gradients are disjoint pieces of one gradient, CPU group for the norm)
    sharded_groups: list[tuple[list[nn.Parameter], object]] = field(default_factory=list)
    # pipeline parallelism: this rank's stage models and ids, the stage count, the pp groups
    stages: list[nn.Module] = field(default_factory=list)
    stage_ids: list[int] = field(default_factory=list)
    num_stages: int = 1
    pp_group: object = None
    pp_cpu_group: object = None
    # the data-parallel group (None: the whole world, or a single process)
    dp_group: object = None
    # groups over which MoE load counts are summed besides data parallel (sequence parallel: tp)
    token_groups: list = field(default_factory=list)
    # the LM head's logits are vocab-sharded DTensors (tensor parallelism): use the parallel loss
    vocab_parallel: bool = False

    def sync_grads(self) -> None:
        for rule in self.rules:
            all_reduce_grads_(rule.params, rule.group, rule.divisor)
