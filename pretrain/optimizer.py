"""Optimizers, parameter groups, gradient clipping and the LR schedule.

Param groups: weight decay on matrices only (no decay on norms, biases and embeddings); Engram
tables get
``optimizer.engram_lr_multiplier`` x LR and no weight decay (the paper), through the row-wise Adam
when the
tables produce sparse gradients, or an AdamW group otherwise.
"""

from __future__ import annotations

import math

import torch

from pretrain.config import LRSchedulerConfig, OptimizerConfig
from pretrain.rowwise_adam import RowwiseAdam


def is_table(name: str) -> bool:
    return name.endswith("table.weight")


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig):
    """``(dense groups, table params)``; each group carries ``lr_mult``."""
    decay, no_decay, dense_tables, sparse_tables = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_table(name):
            sparse = getattr(_owner(model, name), "sparse", False)
            (sparse_tables if sparse else dense_tables).append(param)
        elif param.ndim < 2 or "tok_embeddings" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0, "name": "no_decay"},
    ]
    if dense_tables:
        groups.append(
            {
                "params": dense_tables,
                "weight_decay": 0.0,
                "lr_mult": cfg.engram_lr_multiplier,
                "name": "engram_tables",
            }
        )
    return [g for part in groups for g in _split_dtensors(part)], sparse_tables


def _split_dtensors(group: dict) -> list[dict]:
    """The group's plain tensors and its DTensors (TP/FSDP) as separate groups: a foreach kernel
    takes one kind per list. Checkpoints key optimizer state by parameter name, so the split does
    not tie a checkpoint to a layout."""
    dtensors = [p for p in group["params"] if hasattr(p, "placements")]
    plain = [p for p in group["params"] if not hasattr(p, "placements")]
    parts = [(plain, group["name"]), (dtensors, f"{group['name']}_dtensor")]
    return [{**group, "params": params, "name": name} for params, name in parts if params]


def _owner(model, name):
    module = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
    return module


class Optimizers:
    """AdamW for dense parameters plus row-wise Adam for sparse Engram tables, stepped together."""

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig, cuda: bool | None = None):
        groups, tables = param_groups(model, cfg)
        betas = tuple(cfg.betas)
        # CUDA: the fused kernel (one pass over parameter, gradient and moments) for plain
        # tensors, multi-tensor kernels when TP/FSDP DTensors are present; CPU keeps the loop.
        # ``cuda=True`` picks the CUDA kernels anyway (the simulator's fake CPU tensors).
        params = [p for g in groups for p in g["params"]]
        if cuda is None:
            cuda = any(p.is_cuda for p in params)
        fused = cuda  # DTensor shards the fused kernel like any pointwise op
        self.optimizers = [
            torch.optim.AdamW(
                groups,
                lr=cfg.lr,
                betas=betas,
                eps=cfg.eps,
                foreach=cuda and not fused,
                fused=fused or None,
            )
        ]
        if tables:
            self.optimizers.append(
                RowwiseAdam(
                    [
                        {
                            "params": tables,
                            "lr_mult": cfg.engram_lr_multiplier,
                            "name": "engram_tables",
                        }
                    ],
                    lr=cfg.lr * cfg.engram_lr_multiplier,
                    betas=betas,
                    eps=cfg.eps,
                    state=cfg.engram_state,
                )
            )
        self.base_lr = cfg.lr

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def sparse_tables(self) -> list[torch.nn.Parameter]:
        """The tables updated row by row from sparse gradients (row-wise Adam's parameters)."""
        return [
            p
            for opt in self.optimizers
            if isinstance(opt, RowwiseAdam)
            for g in opt.param_groups
            for p in g["params"]
        ]

    def set_lr(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = self.base_lr * group["lr_mult"] * factor

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        """Drop this step's gradients without an update (a step that did not commit);
        offloaded tables release the rows they held for it."""
        self.zero_grad()
        for param in self.sparse_tables:
            tier = getattr(param, "engram_tier", None)
            if tier is not None:
                tier.step_done()


def clip_grad_norm(params, max_norm: float, sharded_groups=(), stage_group=None) -> torch.Tensor:
    """Global L2 norm over dense, DTensor and sparse gradients; scales them when ``max_norm > 0``.

    ``stage_group``: the (CPU) pipeline group, over which the totals of the stages are summed.
    ``sharded_groups``: ``(params, cpu_group)`` pairs whose local gradients are disjoint pieces of
    one gradient over the group (row-sharded tables, expert shards): their squares are summed
    over it. Plain and DTensor gradients are reduced and scaled with multi-tensor (``foreach``)
    kernels, a few launches per step whatever the parameter count; the sums are float32.
    """
    owner = {id(p): i for i, (group_params, _) in enumerate(sharded_groups) for p in group_params}
    parts: list[list[torch.Tensor]] = [[] for _ in range(len(sharded_groups) + 1)]
    plain: list[list[torch.Tensor]] = [[] for _ in range(len(sharded_groups) + 1)]
    by_mesh: dict = {}  # (mesh, sharded mesh dims) -> DTensor gradients
    for p in params:
        if p.grad is None:
            continue
        key = _dtensor_key(p.grad)
        if key is not None:
            by_mesh.setdefault(key, []).append(p.grad)
        elif p.grad.is_sparse or hasattr(p.grad, "full_tensor"):
            parts[owner.get(id(p), len(sharded_groups))].append(_grad_square(p.grad))
        else:
            plain[owner.get(id(p), len(sharded_groups))].append(p.grad)
    for group, grads in zip(parts, plain):
        if grads:
            group.append(_sum_of_squares(grads))
    for (mesh, dims), grads in by_mesh.items():  # one reduction per mesh group and dim
        local = _sum_of_squares([g.to_local() for g in grads])
        for dim in dims:
            torch.distributed.all_reduce(local, group=mesh.get_group(dim))
        parts[-1].append(local)
    # one device-to-host copy per step (the groups' sums go over CPU process groups)
    sums = [
        torch.stack(group).sum() if group else torch.zeros((), dtype=torch.float32)
        for group in parts
    ]
    squares = torch.stack([s.to(sums[0].device) for s in sums]).cpu()
    for i, (_, group) in enumerate(sharded_groups):
        torch.distributed.all_reduce(squares[i : i + 1], group=group)
    total_square = squares.sum()
    if stage_group is not None:  # pipeline stages hold disjoint parameters
        torch.distributed.all_reduce(total_square, group=stage_group)
    total = total_square.sqrt()
    if max_norm > 0:
        # a host float: scaling by it copies nothing to the device (a CPU tensor would be one
        # synchronising host-to-device copy per parameter)
        coef = min(1.0, max_norm / (total.item() + 1e-6))
        if coef < 1.0:
            for grads in [*plain, *by_mesh.values()]:
                if grads:
                    torch._foreach_mul_(grads, coef)
            for p in params:
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.coalesce() * coef
                elif p.grad is not None and _is_other_dtensor(p.grad):
                    p.grad.mul_(coef)
    return total


def _sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the squares of every element, in float32, from one multi-tensor norm."""
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()


def _is_other_dtensor(grad: torch.Tensor) -> bool:
    """A DTensor outside the Shard/Replicate layouts (its norm took ``full_tensor``)."""
    return hasattr(grad, "full_tensor") and _dtensor_key(grad) is None


def _dtensor_key(grad: torch.Tensor):
    """``(mesh, sharded mesh dims)`` of a DTensor gradient whose placements are all ``Shard``,
    FSDP x TP's ``_StridedShard`` or ``Replicate``: every element lives on exactly one rank of
    the sharded dims, so the sum of the local squares over them is its squared norm. None
    otherwise (plain tensors; ``Partial``, which take ``full_tensor()``)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    placements = getattr(grad, "placements", None)
    if placements is None or any(
        type(p) not in (Shard, _StridedShard, Replicate) for p in placements
    ):
        return None
    sharded = tuple(i for i, p in enumerate(placements) if type(p) is not Replicate)
    return grad.device_mesh, sharded


def _grad_square(grad: torch.Tensor) -> torch.Tensor:
    if grad.is_sparse:
        return grad.coalesce().values().float().pow(2).sum()
    square = grad.float().pow(2).sum()
    return square.full_tensor() if hasattr(square, "full_tensor") else square  # DTensor: a scalar


def lr_factor(step: int, total_steps: int, cfg: LRSchedulerConfig) -> float:
    """LR multiplier for ``step`` (1-based): linear warmup, then cosine or warmup-stable-decay."""
    if step <= cfg.warmup_steps:
        return step / max(cfg.warmup_steps, 1)
    if cfg.name == "cosine":
        progress = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * min(progress, 1))
        )
    decay_start = total_steps - int(cfg.decay_ratio * total_steps)
    if step <= decay_start:
        return 1.0
    progress = (step - decay_start) / max(total_steps - decay_start, 1)
    return 1.0 - (1.0 - cfg.min_lr_ratio) * min(progress, 1.0)
