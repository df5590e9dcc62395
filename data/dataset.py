"""Streaming, packed, hashed, exactly resumable token dataset.

Order: each epoch shuffles the shard order with a seeded RNG (the same on every rank), deals the
shards to DP ranks and then to loader workers, and permutes the documents inside each shard with a
seeded RNG (a shuffle buffer bounded by one shard). Documents (EOS-terminated) are packed back to
back into rows of ``seq_len + 1`` tokens. Each worker ("role") yields whole batches and the N-gram
hash ids of every Engram layer, so hashing never runs on the training step.

The state of a role is five integers (epoch, shard cursor, document cursor, token offset, batches),
so resuming reads one shard and seeks; nothing is replayed.

Legend: B batch, T seq_len, K Engram heads of a layer.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data.batch import Batch, EngramInputs, context_shard, plan_lookups, zigzag_index
from data.shards import CorruptShardError, load_index, read_shard

log = logging.getLogger(__name__)


@dataclass
class RoleState:
    epoch: int = 0
    shard_pos: int = 0  # index into this role's shard list of the epoch
    doc_pos: int = 0  # index into the permuted documents of that shard
    token_pos: int = 0  # tokens of that document already packed
    batches: int = 0


@dataclass
class Part:
    """A shard, or one of ``num_parts`` interleaved document subsets of it when shards are
    scarce."""

    name: str
    part: int
    num_parts: int


class BatchStage:
    """What every stream shares: its shapes and place (DP rank, worker role, context-parallel
    rank), and the stage after packing: hash whole rows, keep this rank's context-parallel share,
    plan the tables' lookups."""

    def _init_stage(
        self, batch_size, seq_len, vocab_size, hasher, strict, planners, plan_chunks, place
    ) -> None:
        """``place``: (dp_rank, dp_degree, role, num_roles, cp_rank, cp_degree)."""
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.dp_rank, self.dp_degree, self.role, self.num_roles, self.cp_rank, self.cp_degree = (
            place
        )
        self.hasher, self.strict = hasher, strict
        self.planners, self.plan_chunks = planners or {}, plan_chunks
        zigzag_index(seq_len, self.cp_degree, self.cp_rank)  # a seq_len chunks cannot split fails

    def _engram_stage(self, batch: Batch) -> Batch:
        """Hash ids of every Engram layer over whole rows, this rank's context-parallel share,
        then the tables' lookup plans."""
        if self.hasher is not None:
            hashed = self.hasher.hash(batch.tokens, batch.doc_ids)
            batch.engram = {layer: EngramInputs(ids) for layer, ids in hashed.items()}
        batch = context_shard(batch, self.cp_degree, self.cp_rank)
        return plan_lookups(batch, self.planners, self.plan_chunks)


def pack_rows(rows: np.ndarray, keys: np.ndarray) -> Batch:
    """Rows ``[B, T+1]`` with a distinct key per document -> a ``Batch``: inputs, labels,
    positions restarting at every document start (and every row start), document ids."""
    docs = keys[:, :-1]
    # local document index per row: 0, 1, 2, ... (a document cut by the row start is document 0)
    starts = np.ones_like(docs, dtype=bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    return Batch(
        tokens=rows[:, :-1].copy(),
        labels=rows[:, 1:].copy(),
        positions=_positions_from_starts(starts),
        doc_ids=np.cumsum(starts, axis=1) - 1,
    )


class PackedShardStream(BatchStage):
    """One role's endless (train) or single-pass (validation) stream of packed, hashed batches.

    Args:
        folder: the prepared data folder (``data.prepare`` output).
        split: "train" or "val".
        batch_size, seq_len: B and T.
        dp_rank, dp_degree: this rank's DP replica and the number of replicas (TP/PP/EP peers of one
            replica pass the same dp_rank and get identical batches).
        role, num_roles: this worker's role and the number of loader workers (at least 1).
        hasher: an ``NgramHasher`` or None (no Engram); its spec decides document reset.
        strict: a corrupt shard raises instead of being skipped with a warning.
        planners: ``{layer: planner}`` of the Engram tables that plan their lookups on the host
            (``data.batch`` describes the protocol); applied after hashing.
        plan_chunks: plan each of this many row chunks on its own (pipeline microbatches).
        cp_rank, cp_degree: context parallelism: every row is hashed whole, then this rank keeps
            its zigzag share of it (``data.batch.context_shard``), and only that is planned.
    """

    def __init__(
        self,
        folder,
        split: str,
        batch_size: int,
        seq_len: int,
        vocab_size: int,
        *,
        seed=0,
        dp_rank=0,
        dp_degree=1,
        role=0,
        num_roles=1,
        hasher=None,
        strict=False,
        shuffle=True,
        url_prefix: str | None = None,
        planners: dict | None = None,
        plan_chunks: int = 1,
        cp_rank: int = 0,
        cp_degree: int = 1,
    ):
        self.folder, self.split = Path(folder), split
        self.index = load_index(self.folder, split)
        self.url_prefix = url_prefix or str(self.folder)
        self.seed, self.shuffle = seed, shuffle
        place = (dp_rank, dp_degree, role, num_roles, cp_rank, cp_degree)
        self._init_stage(
            batch_size, seq_len, vocab_size, hasher, strict, planners, plan_chunks, place
        )
        self.corrupt_shards: list[str] = []
        consumers = dp_degree * num_roles
        names = [s["name"] for s in self.index["shards"]]
        parts = math.ceil(consumers / len(names))
        self.parts = [Part(n, p, parts) for n in names for p in range(parts)]

    def role_parts(self, epoch: int) -> list[Part]:
        order = list(range(len(self.parts)))
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        mine = order[self.dp_rank :: self.dp_degree][self.role :: self.num_roles]
        return [self.parts[i] for i in mine]

    def _docs(self, part: Part, epoch: int) -> list[np.ndarray]:
        try:
            docs = read_shard(f"{self.url_prefix}/{part.name}", self.vocab_size)
        except CorruptShardError as err:
            if self.strict:
                raise
            if part.name not in self.corrupt_shards:
                self.corrupt_shards.append(part.name)
                log.warning(
                    "skipping %s (%d corrupt shard(s) so far)", err, len(self.corrupt_shards)
                )
            return []
        tokens = [d.tokens for i, d in enumerate(docs) if i % part.num_parts == part.part]
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, hash_name(part.name), part.part])
            tokens = [tokens[i] for i in perm.permutation(len(tokens))]
        return tokens

    def batches(self, state: RoleState | None = None):
        """Yield ``(batch, state after it)``; ``state`` resumes exactly where it says."""
        state = RoleState(**asdict(state)) if state is not None else RoleState()
        row_len = self.seq_len + 1
        need = self.batch_size * row_len
        rows, row_docs = np.empty(need, dtype=np.int64), np.empty(need, dtype=np.int64)
        filled = 0
        empty_epochs = 0
        while True:
            parts = self.role_parts(state.epoch)
            progressed = False
            while state.shard_pos < len(parts):
                docs = self._docs(parts[state.shard_pos], state.epoch)
                while state.doc_pos < len(docs):
                    doc = docs[state.doc_pos]
                    take = min(len(doc) - state.token_pos, need - filled)
                    rows[filled : filled + take] = doc[state.token_pos : state.token_pos + take]
                    row_docs[filled : filled + take] = state.doc_pos + (state.shard_pos << 32)
                    filled += take
                    state.token_pos += take
                    progressed = progressed or take > 0
                    if state.token_pos == len(doc):
                        state.doc_pos, state.token_pos = state.doc_pos + 1, 0
                    if filled == need:
                        state.batches += 1
                        yield self._make_batch(rows, row_docs), RoleState(**asdict(state))
                        filled = 0
                state.shard_pos, state.doc_pos, state.token_pos = state.shard_pos + 1, 0, 0
            if not self.shuffle:  # validation: one pass, the partial batch is dropped
                return
            state.epoch, state.shard_pos = state.epoch + 1, 0
            empty_epochs = 0 if progressed else empty_epochs + 1
            if empty_epochs >= 2:
                raise RuntimeError(
                    f"role {self.role} of DP rank {self.dp_rank} found no readable "
                    f"documents in the {self.split} split; every shard it owns is corrupt"
                )

    def _make_batch(self, flat: np.ndarray, flat_docs: np.ndarray) -> Batch:
        return self._engram_stage(self._pack(flat, flat_docs))

    def _pack(self, flat: np.ndarray, flat_docs: np.ndarray) -> Batch:
        shape = (self.batch_size, self.seq_len + 1)
        return pack_rows(flat.reshape(shape), flat_docs.reshape(shape))


def _positions_from_starts(starts: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 at every document start (and at every row start)."""
    idx = np.broadcast_to(np.arange(starts.shape[1]), starts.shape)
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return idx - last_start


def hash_name(name: str) -> int:
    return zlib.crc32(name.encode())
