"""One consumer's batches of a weighted mixture (``data.mixture``): the mixture's counterpart of
``data.dataset.PackedShardStream``, run in the loader workers with the same packing, hashing and
table planning.

State (``batches(state)``): ``schedule`` (the global schedule after the last consumed batch) and
``batch`` (the index of the next global batch); nothing is per role, so a resume continues at any
worker count and DP degree. Each yielded state also carries ``row_sources`` (the source of each of
the batch's rows), ``epochs`` (the epoch each source has reached) and ``skipped`` (records each
source's index skipped), for metrics and ``launch.inspect_data``.

Legend: B batch per rank, T seq_len.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from data.batch import Batch
from data.dataset import BatchStage, pack_rows
from data.mixture import (
    NEEDS_INDEX,
    IndexedRows,
    Schedule,
    ScheduleState,
    SourceSpec,
    open_documents,
)


class MixtureStream(BatchStage):
    """Batches of ``B`` rows for DP rank ``dp_rank`` and worker role ``role``.

    Args:
        specs: the mixture's sources. ``split="val"`` reads each source's ``val_path`` once, in
            order (``val_batches``); training reads ``path`` forever.
        tokenizer_path: the run's tokenizer (text sources tokenise with it in the workers).
        eos_id: the document separator (tokens sources split at it; every document ends with it).
        index_dir: the document index of text and shards sources (``data.doc_index``; built
            before the loader starts).
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
        index_dir: str = "",
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
        self.index_dir = index_dir
        place = (dp_rank, dp_degree, role, num_roles, cp_rank, cp_degree)
        self._init_stage(
            batch_size, seq_len, vocab_size, hasher, strict, planners, plan_chunks, place
        )
        self.schedule = Schedule([s.weight for s in specs])
        self._tokenizer = None

    def tokenizer(self):
        if self._tokenizer is None:
            from data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _rows(self, spec: SourceSpec, split: str, shuffle: bool) -> IndexedRows:
        from data.doc_index import default_dir

        path = spec.path if split == "train" else spec.val_path
        tokenizer = self.tokenizer() if spec.format in NEEDS_INDEX else None
        docs = open_documents(
            spec, path, split, self.eos_id, tokenizer, default_dir(self.index_dir)
        )
        return IndexedRows(docs, self.seq_len + 1, self.seed, shuffle)

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
        rows = {spec.name: self._rows(spec, "train", shuffle=True) for spec in self.specs}
        skipped = {name: getattr(r.docs, "skipped", 0) for name, r in rows.items()}
        per_batch = self.batch_size * self.dp_degree
        while True:
            target = next_batch + (self.role - next_batch) % self.num_roles
            self.schedule.advance(schedule, target * per_batch - schedule.rows)  # others' rows
            chosen = self.schedule.advance(schedule, per_batch)
            mine = chosen[self.dp_rank * self.batch_size : (self.dp_rank + 1) * self.batch_size]
            tokens = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
            keys = np.empty_like(tokens)
            for i, (source, index) in enumerate(mine):
                row = rows[self.specs[source].name].row(index)
                tokens[i], keys[i] = row[0], row[1] + (source << 48)
            next_batch = target + 1
            yield (
                self._finish(tokens, keys),
                {
                    "schedule": asdict(schedule),
                    "batch": next_batch,
                    "row_sources": [source for source, _ in mine],
                    "epochs": self._epochs(rows, schedule),
                    "skipped": skipped,
                },
            )

    def _epochs(self, rows: dict, schedule: ScheduleState) -> dict[str, int]:
        return {
            spec.name: rows[spec.name].epoch_of(max(schedule.counts[i] - 1, 0))
            for i, spec in enumerate(self.specs)
        }

    def val_batches(self, spec: SourceSpec, limit: int) -> list[Batch]:
        """Up to ``limit`` batches of ``spec``'s held-out documents, read once, in order (the
        same on every rank: validation deals them itself)."""
        reader = self._rows(spec, "val", shuffle=False)
        full_rows = reader.epoch_tokens // reader.row_len
        out = []
        for first in range(0, full_rows - self.batch_size + 1, self.batch_size):
            if len(out) == limit:
                break
            block = [reader.row(j) for j in range(first, first + self.batch_size)]
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
