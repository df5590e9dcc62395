"""Typed batches: what the loader yields and the model consumes.

A ``Batch`` carries the packed tokens, labels, positions and document ids, and per Engram layer an
``EngramInputs``: the hash ids (computed in the loader's workers), the lookup plan made by the
layer's table planner (also in the workers), and later the prefetched rows. Fields are numpy arrays
in the workers and torch tensors after ``to_torch()``; ``to(device)`` moves them and leaves the
host-side parts of a plan (all-to-all split counts) on the host.

Planners are injected (``data/`` never imports ``parallel/``): a planner is a picklable callable
``planner(hash_ids [B, T, K] numpy, num_chunks) -> plan``, where the plan implements
``to_torch()`` and ``to(device, non_blocking)``. ``num_chunks > 1`` plans each of that many equal
row chunks on its own (pipeline microbatches); every tensor of such a plan has the chunks (or the
batch rows) on dim 0, so splitting the batch on dim 0 splits the plan with it.

Batch, EngramInputs and plans are registered pytree dataclasses, so the pipeline schedule chunks
them into microbatches like any tensor argument.

Legend: B batch, T sequence, K Engram heads of a layer, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils import _pytree as pytree


class LookupPlan(Protocol):
    def to_torch(self) -> LookupPlan: ...

    def to(self, device, non_blocking: bool = False) -> LookupPlan: ...

    def pin_memory(self) -> LookupPlan: ...


def host_side(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a plan's tensor as host-resident by design (split counts, unique row ids): reading
    it never waits for a device, so the host-sync counter of the tests does not count it."""
    tensor.host_side = True
    return tensor


def _pin(value):
    return value.pin_memory() if torch.is_tensor(value) else value


def _to_torch(value):
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


@dataclass
class EngramInputs:
    """One Engram layer's inputs for one batch."""

    hash_ids: Any  # [B, T, K] per-head ids, before head offsets
    plan: Any = None  # the table planner's ``LookupPlan`` (None: the table needs none)
    rows: Any = None  # prefetched rows [B, T, K, Dh], for tables off the device

    def to_torch(self) -> EngramInputs:
        plan = self.plan.to_torch() if self.plan is not None else None
        return EngramInputs(_to_torch(self.hash_ids), plan, _to_torch(self.rows))

    def to(self, device, non_blocking: bool = False) -> EngramInputs:
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        plan = self.plan.to(device, non_blocking) if self.plan is not None else None
        return EngramInputs(move(self.hash_ids), plan, move(self.rows))

    def pin_memory(self) -> EngramInputs:
        plan = self.plan.pin_memory() if self.plan is not None else None
        return EngramInputs(_pin(self.hash_ids), plan, _pin(self.rows))


@dataclass
class Batch:
    """One packed batch (numpy in the loader workers, torch after ``to_torch()``)."""

    tokens: Any  # [B, T] input ids
    labels: Any  # [B, T] next-token targets
    positions: Any  # [B, T] positions, restarting at 0 at every document start
    doc_ids: Any  # [B, T] document index inside the row (0, 1, 2, ...)
    engram: dict[int, EngramInputs] = field(default_factory=dict)  # per Engram layer

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.labels.shape))

    def to_torch(self) -> Batch:
        return Batch(
            *(_to_torch(v) for v in (self.tokens, self.labels, self.positions, self.doc_ids)),
            engram={layer: e.to_torch() for layer, e in self.engram.items()},
        )

    def to(self, device, non_blocking: bool = True) -> Batch:
        def move(t):
            return t.to(device, non_blocking=non_blocking)

        return Batch(
            *(move(v) for v in (self.tokens, self.labels, self.positions, self.doc_ids)),
            engram={layer: e.to(device, non_blocking) for layer, e in self.engram.items()},
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``), so that
        ``to(device, non_blocking=True)`` overlaps the copy with compute."""
        return Batch(
            *(_pin(v) for v in (self.tokens, self.labels, self.positions, self.doc_ids)),
            engram={layer: e.pin_memory() for layer, e in self.engram.items()},
        )

    def select_rows(self, rows: slice) -> Batch:
        """Rows ``rows`` of the batch; lookup plans are dropped (plan the slice again)."""
        return Batch(
            self.tokens[rows],
            self.labels[rows],
            self.positions[rows],
            self.doc_ids[rows],
            {k: EngramInputs(e.hash_ids[rows]) for k, e in self.engram.items()},
        )

    def only_layers(self, layers) -> Batch:
        """The same batch with the Engram inputs of ``layers`` only (a pipeline stage's own)."""
        keep = set(layers)
        return replace(self, engram={k: e for k, e in self.engram.items() if k in keep})


def zigzag_index(seq: int, degree: int, rank: int) -> np.ndarray:
    """The positions context-parallel rank ``rank`` of ``degree`` holds of a row of ``seq``:
    chunks ``rank`` and ``2 * degree - 1 - rank`` of ``2 * degree`` equal chunks (zigzag, so every
    rank gets the same share of causal attention)."""
    if seq % (2 * degree):
        raise ValueError(
            f"data.seq_len={seq} must be divisible by 2 * parallelism.context_parallel_degree "
            f"= {2 * degree} (each rank holds two equal chunks of every row)"
        )
    chunk = seq // (2 * degree)
    second = 2 * degree - 1 - rank
    return np.concatenate(
        [
            np.arange(rank * chunk, (rank + 1) * chunk),
            np.arange(second * chunk, (second + 1) * chunk),
        ]
    )


def context_shard(batch: Batch, degree: int, rank: int) -> Batch:
    """This context-parallel rank's zigzag share of every row (``zigzag_index``), taken after the
    whole rows were hashed and before the lookups are planned. Positions and document ids stay
    the whole row's, so the shard needs nothing else to be exact."""
    if degree == 1:
        return batch
    index = zigzag_index(int(batch.tokens.shape[1]), degree, rank)

    def take(value):
        if torch.is_tensor(value):
            return value[:, torch.from_numpy(index).to(value.device)]
        return np.ascontiguousarray(value[:, index])

    return Batch(
        *(take(v) for v in (batch.tokens, batch.labels, batch.positions, batch.doc_ids)),
        engram={k: EngramInputs(take(e.hash_ids)) for k, e in batch.engram.items()},
    )


def plan_lookups(batch: Batch, planners: dict, num_chunks: int = 1) -> Batch:
    """Apply each layer's planner to its hash ids (numpy, or CPU tensors in tests)."""
    if num_chunks < 1 or batch.batch_size % num_chunks:
        raise ValueError(
            f"training.batch_size={batch.batch_size} must be divisible by the {num_chunks} "
            "pipeline microbatches the lookups are planned for"
        )
    engram = dict(batch.engram)
    for layer, planner in planners.items():
        if layer not in engram:
            continue
        ids = engram[layer].hash_ids
        host = ids.numpy() if torch.is_tensor(ids) else np.asarray(ids)
        plan = planner(host, num_chunks)
        if torch.is_tensor(ids) and plan is not None:
            plan = plan.to_torch()
        engram[layer] = EngramInputs(ids, plan, engram[layer].rows)
    return replace(batch, engram=engram)


def unique_per_chunk(flat_ids: np.ndarray, num_chunks: int = 1):
    """Deduplicate each of ``num_chunks`` equal row chunks of flat row ids ``[B, T, K]`` on its
    own: ``(unique [C, U] sorted per chunk and 0-padded, counts [C], inverse [B, T, K])``, where
    ``inverse`` is the position of every lookup in its chunk's unique ids (planners' core)."""
    uniques, inverses = [], []
    for chunk in np.split(np.asarray(flat_ids), num_chunks, axis=0):
        unique, inverse = np.unique(chunk, return_inverse=True)
        uniques.append(unique)
        inverses.append(inverse.reshape(chunk.shape))
    padded = np.zeros((num_chunks, max(len(u) for u in uniques)), dtype=np.int64)
    for i, unique in enumerate(uniques):
        padded[i, : len(unique)] = unique
    counts = np.array([len(u) for u in uniques], dtype=np.int64)
    return padded, counts, np.concatenate(inverses).astype(np.int64)


def register_pytree(cls) -> type:
    """Register a dataclass of tensors (or None) as a pytree node, so the pipeline schedule can
    chunk it on dim 0 (call once per class, at import)."""
    pytree.register_dataclass(cls)
    return cls


register_pytree(EngramInputs)
register_pytree(Batch)
