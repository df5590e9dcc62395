"""The model-agnostic contract between the trainer and a parallelised model.

``parallelize_<family>()`` returns a ``ParallelPlan`` next to the model: which gradients need a
synchronisation that DDP/FSDP do not do (sparse replicated tables, row-sharded tables, expert
shards, sequence-local parameters), which parameters hold disjoint pieces of one gradient (for the
global norm), the pipeline stages, and the groups MoE load counts are summed over.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn

from parallel.data_parallel import all_reduce_grads_, local_grad, mean_divisor


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
    # the context-parallel group (None: none); its ranks hold chunks of the same rows
    cp_group: object = None
    # groups over which MoE load counts are summed besides data parallel (sequence parallel: tp)
    token_groups: list = field(default_factory=list)
    # the LM head's logits are vocab-sharded DTensors (tensor parallelism): use the parallel loss
    vocab_parallel: bool = False
    # fault tolerance: the link to the other replica groups (``parallel.replicas.ReplicaSync``)
    replicas: object = None

    # asynchronous all-reduces started during the last backward: id(param) -> (work, param)
    pending: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def overlap_grad_sync(self, active: bool = True):
        """Around the backward that finishes the gradients: every dense gradient a rule reduces
        over a group starts its all-reduce as soon as it is accumulated (asynchronously, beside
        the rest of the backward, like DDP's buckets); ``sync_grads`` waits for them."""
        handles = []
        if active:
            for rule in self.rules:
                if rule.group is None:
                    continue
                for param in rule.params:
                    handles.append(param.register_post_accumulate_grad_hook(self._start(rule)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _start(self, rule: GradSyncRule):
        def hook(param: nn.Parameter) -> None:
            if param.grad is None or param.grad.is_sparse:
                return  # sparse gradients are gathered in sync_grads
            work = dist.all_reduce(local_grad(param.grad), group=rule.group, async_op=True)
            self.pending[id(param)] = (work, param)

        return hook

    def sync_grads(self) -> None:
        for rule in self.rules:
            done = {id(p) for p in rule.params if id(p) in self.pending}
            for key in done:
                work, param = self.pending.pop(key)
                work.wait()
                local_grad(param.grad).div_(mean_divisor(rule.group, rule.divisor))
            rest = [p for p in rule.params if id(p) not in done]
            all_reduce_grads_(rest, rule.group, rule.divisor)
