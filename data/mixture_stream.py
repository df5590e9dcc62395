"""One consumer's batches of a weighted mixture (``data.mixture``): the mixture's counterpart of
``data.dataset.PackedShardStream``, run in the loader workers with the same packing, hashing and
table planning.

State (``batches(state)``): ``schedule`` (the global schedule after the last consumed batch),
``batch`` (the index of the next global batch), ``streams`` (this role's cursor in each streamed
source). Each yielded state also carries ``row_sources`` (the source of each of the batch's rows)
and ``epochs`` (the epoch each source has reached), for metrics and ``data.inspect``.

Legend: B batch per rank, T seq_len.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from data.batch import Batch
from data.dataset import BatchStage, pack_rows
from data.formats import SkipCount
from data.mixture import (
    Exhausted,
    IndexedRows,
    Schedule,
    ScheduleState,
    SourceSpec,
    StreamState,
    source_rows,
)


class MixtureStream(BatchStage):
    """Batches of ``B`` rows for DP rank ``dp_rank`` and worker role ``role``.

    Args:
        specs: the mixture's sources. ``split="val"`` reads each source's ``val_path`` once, in
            order (``val_batches``); training reads ``path`` forever.
        tokenizer_path: the run's tokenizer (text sources tokenise with it in the workers).
        eos_id: the document separator (tokens sources split at it; every document ends with it).
        hasher, planners, plan_chunks, cp_rank, cp_degree, strict, seed: as ``PackedShardStream``.
    """

    def __init__(
        self,
        specs: list[SourceSpec],
        batch_size: int,
        seq_len: int,
        vocab_size: int,
        *,
        tokenizer_path: str,
        eos_id: int,
        seed: int = 0,
        dp_rank: int = 0,
        dp_degree: int = 1,
        role: int = 0,
        num_roles: int = 1,
        hasher=None,
        strict: bool = False,
        planners: dict | None = None,
        plan_chunks: int = 1,
        cp_rank: int = 0,
        cp_degree: int = 1,
    ):
        self.specs = specs
        self.tokenizer_path, self.eos_id, self.seed = tokenizer_path, eos_id, seed
        place = (dp_rank, dp_degree, role, num_roles, cp_rank, cp_degree)
        self._init_stage(
            batch_size, seq_len, vocab_size, hasher, strict, planners, plan_chunks, place
        )
        self.schedule = Schedule([s.weight for s in specs])
        self.skips = {s.name: SkipCount(s.name, strict) for s in specs}
        self._tokenizer = None

    @property
    def consumer(self) -> int:
        return self.dp_rank * self.num_roles + self.role

    @property
    def consumers(self) -> int:
        return self.dp_degree * self.num_roles

    def tokenizer(self):
        if self._tokenizer is None:
            from data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _rows(self, spec: SourceSpec, split: str, state, consumer: int, consumers: int, shuffle):
        needs_tokenizer = spec.format == "text"
        return source_rows(
            spec,
            spec.path if split == "train" else spec.val_path,
            split=split,
            row_len=self.seq_len + 1,
            seed=self.seed,
            shuffle=shuffle,
            consumer=consumer,
            consumers=consumers,
            tokenizer=self.tokenizer() if needs_tokenizer else None,
            eos_id=self.eos_id,
            skips=self.skips[spec.name],
            shard_kwargs=dict(
                batch_size=1, seq_len=self.seq_len, vocab_size=self.vocab_size, seed=self.seed
            ),
            state=state,
        )

    def batches(self, state: dict | None = None):
        """Yield ``(batch, state after it)`` for this role's global batches, forever."""
        state = state or {}
        schedule = self.schedule.start()
        if "schedule" in state:  # copied: the caller's state stays as it was
            saved = state["schedule"]
            schedule = ScheduleState(
                int(saved["rows"]), list(saved["counts"]), list(saved["credits"])
            )
        next_batch = int(state.get("batch", 0))
        streams = state.get("streams", {})
        rows = {
            spec.name: self._rows(
                spec,
                "train",
                StreamState(**streams[spec.name]) if spec.name in streams else None,
                self.consumer,
                self.consumers,
                shuffle=True,
            )
            for spec in self.specs
        }
        per_batch = self.batch_size * self.dp_degree
        while True:
            target = next_batch + (self.role - next_batch) % self.num_roles
            self.schedule.advance(schedule, target * per_batch - schedule.rows)  # others' rows
            chosen = self.schedule.advance(schedule, per_batch)
            mine = chosen[self.dp_rank * self.batch_size : (self.dp_rank + 1) * self.batch_size]
            tokens = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
            keys = np.empty_like(tokens)
            for i, (source, index) in enumerate(mine):
                reader = rows[self.specs[source].name]
                row = reader.row(index) if isinstance(reader, IndexedRows) else reader.next_row()
                tokens[i], keys[i] = row[0], row[1] + (source << 48)
            next_batch = target + 1
            yield (
                self._finish(tokens, keys),
                {
                    "schedule": asdict(schedule),
                    "batch": next_batch,
                    "streams": {
                        n: asdict(r.state)
                        for n, r in rows.items()
                        if not isinstance(r, IndexedRows)
                    },
                    "row_sources": [source for source, _ in mine],
                    "epochs": self._epochs(rows, schedule),
                    "skipped": {n: s.count for n, s in self.skips.items()},
                },
            )

    def _epochs(self, rows: dict, schedule: ScheduleState) -> dict[str, int]:
        out = {}
        for i, spec in enumerate(self.specs):
            reader = rows[spec.name]
            if isinstance(reader, IndexedRows):
                out[spec.name] = reader.epoch_of(max(schedule.counts[i] - 1, 0))
            else:
                out[spec.name] = reader.state.epoch
        return out

    def val_batches(self, spec: SourceSpec, limit: int) -> list[Batch]:
        """Up to ``limit`` batches of ``spec``'s held-out documents, read once, in order (the
        same on every rank: validation deals them itself)."""
        reader = self._rows(spec, "val", None, 0, 1, shuffle=False)
        if isinstance(reader, IndexedRows):
            full_rows = reader.epoch_tokens // reader.row_len
            produce = iter(reader.row(j) for j in range(full_rows))
        else:
            reader.single_pass = True
            produce = _until_exhausted(reader)
        out = []
        while len(out) < limit:
            block = [row for _, row in zip(range(self.batch_size), produce)]
            if len(block) < self.batch_size:
                break
            tokens = np.stack([r[0] for r in block])
            keys = np.stack([r[1] for r in block])
            out.append(self._finish(tokens, keys))
        return out

    def _finish(self, tokens: np.ndarray, keys: np.ndarray) -> Batch:
        """Pack, hash whole rows, keep this rank's context-parallel share, plan the lookups."""
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise ValueError(
                f"token id {int(tokens.max())} >= vocab size {self.vocab_size} in a mixture "
                "batch: a source was tokenized with another tokenizer"
            )
        return self._engram_stage(pack_rows(tokens, keys))


def _until_exhausted(reader):
    while True:
        try:
            yield reader.next_row()
        except Exhausted:
            return
