"""Row-wise Adam for Engram tables: updates only the rows a step touched.

Semantics follow ``torch.optim.SparseAdam`` (lazy Adam): the moments of untouched rows are left
alone, bias correction uses the optimizer's step count. The step's cost is O(touched rows x Dh),
independent of the table's size. Weight decay is 0 by design (the paper). A row-sharded table
passes its local shard and local-row gradients; nothing here is global.

Rows live where their table keeps them: an in-memory table's moments are tensors of its shape
here; an offloaded table (``models.engram_offload``) keeps rows and moments together in its tier,
and the update runs on its cache slots. Both gather the touched rows, update them with the one
function ``adam_rows_`` and write them back, so an offloaded table trains bit-identically to an
in-memory one.
"""

from __future__ import annotations

import numpy as np
import torch

from models.row_tier import split_records


def adam_rows_(w, m, v, grad, step: float, lr: float, betas, eps: float) -> None:
    """One lazy-Adam update of gathered rows ``w``, moments ``m``, ``v`` (in place, ``[U, Dh]``)."""
    beta1, beta2 = betas
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # torch.optim.SparseAdam's arrangement: eps added to the uncorrected sqrt(v)
    step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
    w.add_(m / v.sqrt().add_(eps), alpha=-step_size)


class RowwiseAdam(torch.optim.Optimizer):
    """Lazy Adam over sparse (or dense) row gradients of 2-D tables.

    State is created here, not at the first step, so that a checkpoint can be loaded before any
    step without a full-size dummy gradient (DCP's state-dict helpers take a step otherwise).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8):
        if lr < 0:
            raise ValueError(f"optimizer.lr={lr}: must be >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                state["step"] = torch.zeros((), dtype=torch.float64)
                if not hasattr(param, "engram_tier"):  # offloaded: moments live in the tier
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper = dict(lr=group["lr"], betas=group["betas"], eps=group["eps"])
            for param in group["params"]:
                tier = getattr(param, "engram_tier", None)
                if param.grad is not None:
                    state = self.state[param]
                    state["step"] += 1
                    rows, values = _touched_rows(param.grad)
                    step = state["step"].item()
                    if tier is None:
                        _update_in_memory(param, state, rows, values, step, hyper)
                    else:
                        _update_in_tier(tier, rows, values, step, hyper)
                if tier is not None:
                    tier.step_done()
        return loss


def _update_in_memory(param, state, rows, values, step, hyper) -> None:
    w, m, v = (t.index_select(0, rows) for t in (param, state["exp_avg"], state["exp_avg_sq"]))
    adam_rows_(w, m, v, values, step, **hyper)
    for target, updated in ((param, w), (state["exp_avg"], m), (state["exp_avg_sq"], v)):
        target.index_copy_(0, rows, updated)


def _update_in_tier(tier, rows, values, step, hyper) -> None:
    """The rows' records sit in the tier's cache slots since their lookup (pinned)."""
    host_rows = tier.step_rows()  # the coalesced gradient's rows, known on the host
    if rows.device.type == "cpu" and not np.array_equal(rows.numpy(), host_rows):
        raise RuntimeError("the table gradient's rows differ from the rows looked up this step")
    cache = tier.cache
    slots = torch.from_numpy(cache.slots(host_rows)).to(cache.device)
    records = cache.records.index_select(0, slots)
    w, m, v = (field.contiguous() for field in split_records(records))
    adam_rows_(w, m, v, values, step, **hyper)
    cache.records.index_copy_(0, slots, torch.cat([w, m, v], dim=1))


def _touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids, summed row gradients) of a sparse COO or dense 2-D gradient."""
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows)
