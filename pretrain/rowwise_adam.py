"""Row-wise Adam for Engram tables: updates only the rows a step touched.

Semantics follow ``torch.optim.SparseAdam`` (lazy Adam): the moments of untouched rows are left
alone, bias correction uses the optimizer's step count. The step's cost is O(touched rows x Dh),
independent of the table's size (the moment buffers are allocated once). Weight decay is 0 by design
(the paper). A row-sharded table passes its local shard and local-row gradients; nothing here is
global.
"""

from __future__ import annotations

import torch


class RowwiseAdam(torch.optim.Optimizer):
    """Lazy Adam over sparse (or dense) row gradients of 2-D tables."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8):
        if lr < 0:
            raise ValueError(f"optimizer.lr={lr}: must be >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                rows, values = _touched_rows(param.grad)
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = state["step"].item()
                exp_avg = (
                    state["exp_avg"].index_select(0, rows).mul_(beta1).add_(values, alpha=1 - beta1)
                )
                exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
                exp_avg_sq.mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, exp_avg)
                state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
                # torch.optim.SparseAdam's arrangement: eps added to the uncorrected sqrt(v)
                step_size = group["lr"] * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                param.index_add_(0, rows, exp_avg / denom, alpha=-step_size)
        return loss


def _touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids, summed row gradients) of a sparse COO or dense 2-D gradient."""
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows)
