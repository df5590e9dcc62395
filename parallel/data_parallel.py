"""Data parallelism: DDP across replicas, FSDP2 (``fully_shard``) or HSDP over the dp mesh axes.

DDP only buckets dense gradients, so parameters with sparse gradients (Engram tables) are left out
of DDP and averaged by ``all_reduce_grads_`` after backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def apply_ddp(model: nn.Module, mesh, sparse_param_names: list[str] = ()) -> nn.Module:
    """DDP over the ``dp_replicate`` axis; ``sparse_param_names`` are left to the caller."""
    from torch.nn.parallel import DistributedDataParallel

    if sparse_param_names:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, list(sparse_param_names)
        )
    group = mesh["dp_replicate"].get_group()
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, process_group=group, device_ids=device_ids)


def local_grad(grad: torch.Tensor) -> torch.Tensor:
    """The tensor a collective works on in place: a DTensor gradient's local shard."""
    return grad.to_local() if hasattr(grad, "to_local") else grad


def mean_divisor(group, divisor: float | None) -> float:
    """``divisor``, or the group size (an average) when it is None."""
    return dist.get_world_size(group) if divisor is None else divisor


def all_reduce_grads_(params: list[nn.Parameter], group=None, divisor: float | None = None) -> None:
    """Sum gradients (dense or sparse COO) over ``group`` in place, then divide by ``divisor``
    (default: the group size, i.e. average). ``group=None`` skips the communication."""
    if group is None:
        for param in params:
            if param.grad is not None and divisor:
                param.grad = param.grad / divisor
        return
    world = mean_divisor(group, divisor)
    for param in params:
        if param.grad is None:  # every rank must join the collective
            param.grad = torch.zeros_like(param)
        grad = param.grad
        if grad.is_sparse:
            # gather every rank's touched rows (gloo/NCCL need equal sizes: pad to the maximum)
            grad = grad.coalesce()
            param.grad = _all_gather_sparse(grad, group).coalesce() / world
        else:
            local = local_grad(grad)
            dist.all_reduce(local, group=group)
            local.div_(world)


def _all_gather_sparse(grad: torch.Tensor, group) -> torch.Tensor:
    def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, tensor, group=group)
        return out

    rows, values = gather_rows(grad.indices()[0], grad.values(), gather)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, grad.shape)


def gather_rows(rows: torch.Tensor, values: torch.Tensor, gather):
    """Every rank's ``(rows, values)`` (row ids and their ``[n, ...]`` values), concatenated in
    rank order. ``gather(t)`` returns every rank's ``t`` (equal shapes: counts go first, then
    rows and values padded to the longest), or None when it failed (then so does this)."""
    counts = gather(torch.tensor([rows.numel()], device=rows.device))
    if counts is None:
        return None
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    pad_rows = torch.zeros(longest, dtype=rows.dtype, device=rows.device)
    pad_values = torch.zeros(longest, *values.shape[1:], dtype=values.dtype, device=values.device)
    pad_rows[: rows.numel()], pad_values[: rows.numel()] = rows, values
    all_rows = gather(pad_rows)
    all_values = gather(pad_values) if all_rows is not None else None
    if all_values is None:
        return None
    rows = torch.cat([r[:n] for r, n in zip(all_rows, sizes, strict=True)])
    values = torch.cat([v[:n] for v, n in zip(all_values, sizes, strict=True)])
    return rows, values


def apply_fsdp(
    model: nn.Module,
    mesh,
    blocks: list[nn.Module],
    reshard_after_forward: bool = True,
    ignored_params: set[nn.Parameter] | None = None,
    extra_units: list[nn.Module] = (),
    param_dtype: torch.dtype | None = None,
):
    """FSDP2 per block (and per ``extra_units`` module), then the root, over ``mesh``
    (``ParallelDims.fsdp_mesh``: 2-D for HSDP).

    ``ignored_params`` stay local (row-sharded tables, expert shards: sharded by their own plan).
    ``extra_units``: modules a pipeline stage calls without going through the root's forward.
    ``param_dtype``: compute dtype of the unsharded parameters (bf16 mixed precision); gradients
    are reduced in float32 and the sharded parameters stay float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        ignored_params=ignored_params or None,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
    )
    for block in [*blocks, *extra_units]:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
