"""Row-wise optimizers for Engram tables: update only the rows a step touched.

``optimizer.engram_state`` picks the state each row keeps (``models.tables.tier.ENGRAM_STATES``):

- ``adam`` (default): lazy Adam, ``torch.optim.SparseAdam``'s semantics: both moments per
  element; the moments of untouched rows are left alone, bias correction uses the optimizer's
  step count. 2 x Dh floats of state per row.
- ``adam_row_v``: the same with one second moment per row (the mean of the row's squared
  gradient), as in row-wise Adam of recommendation stacks. Dh + 1 floats per row.
- ``adagrad_row``: row-wise Adagrad: one accumulated mean squared gradient per row, no momentum.
  1 float per row; its learning rate is the tables' (``engram_lr_multiplier`` x LR), with no
  bias correction.

The step's cost is O(touched rows x Dh), independent of the table's size. Weight decay is 0 by
design (the paper). A row-sharded table passes its local shard and local-row gradients; nothing
here is global.

Rows live where their table keeps them: an in-memory table's state is tensors here; an offloaded
table (``models.tables.offload``) keeps rows and state together in its tier's records, and the
update runs on its cache slots. Both gather the touched rows, update them with the one function
``update_rows_`` and write them back, so an offloaded table trains bit-identically to an in-memory
one.
"""

from __future__ import annotations

import numpy as np
import torch

from models.tables.tier import engram_state_fields, record_layout, split_records


def adam_rows_(w, m, v, grad, step: float, lr: float, betas, eps: float) -> None:
    """One lazy-Adam update of gathered rows ``w``, moments ``m``, ``v`` (in place, ``[U, Dh]``;
    ``v`` may be ``[U, 1]``: one second moment per row, fed the mean squared gradient)."""
    beta1, beta2 = betas
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    if v.shape[1] == grad.shape[1]:
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        v.mul_(beta2).add_(grad.square().mean(dim=1, keepdim=True), alpha=1 - beta2)
    # torch.optim.SparseAdam's arrangement: eps added to the uncorrected sqrt(v)
    step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
    w.add_(m / v.sqrt().add_(eps), alpha=-step_size)


def adagrad_rows_(w, s, grad, lr: float, eps: float) -> None:
    """One row-wise Adagrad update of gathered rows ``w [U, Dh]`` with accumulators ``s [U, 1]``."""
    s.add_(grad.square().mean(dim=1, keepdim=True))
    w.addcdiv_(grad, s.sqrt().add_(eps), value=-lr)


def _adam_math(w, m, v, grad, step_size, beta1, beta2, eps):
    """``adam_rows_`` out of place (the body of the fused update; the hyper-parameters may be
    0-d tensors, graph inputs of the compiled update)."""
    m = m * beta1 + grad * (1 - beta1)
    if v.shape[1] == grad.shape[1]:
        v = v * beta2 + grad * grad * (1 - beta2)
    else:
        v = v * beta2 + grad.square().mean(dim=1, keepdim=True) * (1 - beta2)
    return w - step_size * (m / (v.sqrt() + eps)), m, v


def _adagrad_math(w, s, grad, lr, eps):
    s = s + grad.square().mean(dim=1, keepdim=True)
    return w - lr * (grad / (s.sqrt() + eps)), s


def _updated(fields, grad, scalars):
    if len(fields) == 3:
        return _adam_math(*fields, grad, scalars[0], scalars[1], scalars[2], scalars[3])
    return _adagrad_math(*fields, grad, scalars[0], scalars[1])


def _scalars(fields: int, values, step: float, lr: float, betas, eps: float) -> torch.Tensor:
    """The update's hyper-parameters as one small tensor on the rows' device (a non-blocking
    copy), so that the compiled update takes them as inputs and never recompiles for them."""
    if fields == 3:
        beta1, beta2 = betas
        step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        host = [step_size, beta1, beta2, eps]
    else:
        host = [lr, eps]
    return torch.tensor(host, dtype=values.dtype).to(values.device, non_blocking=True)


def _fused_in_memory_(targets, rows, grad, scalars) -> None:
    """Gather the rows and their state, update, scatter back: one compiled kernel region."""
    fields = [t.index_select(0, rows) for t in targets]
    for target, new in zip(targets, _updated(fields, grad, scalars), strict=True):
        target.index_copy_(0, rows, new)


def _fused_in_records_(records, slots, widths: list[int], grad, scalars) -> None:
    """The same over records (the row and its state side by side) at cache ``slots``."""
    fields = records.index_select(0, slots).split(widths, dim=1)
    records.index_copy_(0, slots, torch.cat(_updated(fields, grad, scalars), dim=1))


_COMPILED: dict = {}


def _compiled(fn):
    """``fn`` compiled once per process (dynamic row counts)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[fn]


def update_rows_(fields, grad, step: float, lr: float, betas, eps: float) -> None:
    """Update gathered ``fields`` (the row, then its state, as ``record_layout`` orders them)."""
    if len(fields) == 3:
        adam_rows_(*fields, grad, step, lr, betas, eps)
    else:
        adagrad_rows_(*fields, grad, lr, eps)


class RowwiseAdam(torch.optim.Optimizer):
    """Row-wise Adam (or Adagrad: ``state``) over sparse (or dense) row gradients of 2-D tables.

    State is created here, not at the first step, so that a checkpoint can be loaded before any
    step without a full-size dummy gradient (DCP's state-dict helpers take a step otherwise).

    Args:
        state: ``optimizer.engram_state`` (``adam``, ``adam_row_v`` or ``adagrad_row``).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.95),
        eps: float = 1e-8,
        state: str = "adam",
        fused: bool | None = None,
    ):
        if lr < 0:
            raise ValueError(f"optimizer.lr={lr}: must be >= 0")
        engram_state_fields(state)  # a clear error for an unknown state, before anything else
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))
        self.kind = state
        self.fused = fused
        for group in self.param_groups:
            for param in group["params"]:
                tier = getattr(param, "engram_tier", None)
                if tier is not None and list(tier.store.layout)[1:] != self.state_names:
                    raise ValueError(
                        f"optimizer.engram_state={state!r} but the offloaded table keeps "
                        f"{list(tier.store.layout)[1:]}: place the tables with the same "
                        "engram_state"
                    )
                entry = self.state[param]
                entry["step"] = torch.zeros((), dtype=torch.float64)
                if tier is None:  # offloaded: the state lives in the tier
                    layout = record_layout(state, param.shape[1])
                    for name in self.state_names:
                        entry[name] = param.new_zeros(param.shape[0], layout[name])

    @property
    def state_names(self) -> list[str]:
        """The per-row state of every table (the optimizer state keys besides ``step``)."""
        return list(engram_state_fields(self.kind))

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
                        self._update_in_memory(param, state, rows, values, step, hyper)
                    else:
                        _update_in_tier(tier, rows, values, step, hyper, self._fuse(values))
                if tier is not None:
                    tier.step_done()
        return loss

    @torch.no_grad()
    def rows_touched(self, block_rows: int = 1 << 20) -> tuple[int, int]:
        """(rows that have ever had a nonzero gradient, rows) over this rank's tables.

        A row's last state field (Adam's second moment, Adagrad's accumulator) stays exactly 0
        until its first nonzero gradient, so it records which rows training reached. An
        offloaded table is flushed and read from its store, ``block_rows`` records at a time.
        """
        touched = total = 0
        last = self.state_names[-1]
        for group in self.param_groups:
            for param in group["params"]:
                tier = getattr(param, "engram_tier", None)
                if tier is None:
                    moment = self.state[param][last]
                    moment = getattr(moment, "_local_tensor", moment)  # a row-sharded DTensor
                else:
                    tier.cache.flush()
                    moment = tier.store.field(last)
                total += moment.shape[0]
                for start in range(0, moment.shape[0], block_rows):
                    block = moment[start : start + block_rows]
                    touched += int(block.ne(0).any(dim=1).sum())
        return touched, total

    def _fuse(self, values: torch.Tensor) -> bool:
        """The compiled update: asked for (``fused=True``), or by default on CUDA."""
        return self.fused if self.fused is not None else values.is_cuda

    def _update_in_memory(self, param, state, rows, values, step, hyper) -> None:
        targets = [param, *(state[name] for name in self.state_names)]
        if self._fuse(values):
            scalars = _scalars(len(targets), values, step, **hyper)
            # a detached alias: dynamo cannot take a sparse tensor's values tensor as an input
            _compiled(_fused_in_memory_)(targets, rows, values.detach(), scalars)
            return
        fields = [t.index_select(0, rows) for t in targets]
        update_rows_(fields, values, step, **hyper)
        for target, updated in zip(targets, fields, strict=True):
            target.index_copy_(0, rows, updated)


def _update_in_tier(tier, rows, values, step, hyper, fused: bool = False) -> None:
    """The rows' records sit in the tier's cache slots since their lookup (pinned)."""
    host_rows = tier.step_rows()  # the coalesced gradient's rows, known on the host
    if rows.device.type == "cpu" and not np.array_equal(rows.numpy(), host_rows):
        raise RuntimeError("the table gradient's rows differ from the rows looked up this step")
    cache = tier.cache
    slots = cache.upload(cache.slots(host_rows))
    if fused:
        widths = list(tier.store.layout.values())
        scalars = _scalars(len(widths), values, step, **hyper)
        _compiled(_fused_in_records_)(cache.records, slots, widths, values.detach(), scalars)
        return
    records = cache.records.index_select(0, slots)
    update_rows_(split_records(records, tier.store.layout), values, step, **hyper)  # in place
    cache.records.index_copy_(0, slots, records)


def _touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids, summed row gradients) of a sparse COO or dense 2-D gradient."""
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows)
