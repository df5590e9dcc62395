"""Weighted mixtures of sources: ``[[data.mixture]]`` tables, read in one global order.

Every source yields rows of ``seq_len + 1`` tokens packed from its own documents (EOS-terminated,
in its own seeded, shuffled order, epoch after epoch). The mixture decides the source of each
global row with a smooth weighted round robin on integer weights: deterministic on any machine,
and every window of n rows holds each source's share to within one row.

Global row ``k`` belongs to global batch ``k // (B * dp)``; data-parallel rank ``r`` takes rows
``r * B .. (r + 1) * B`` of it, and loader worker role ``g % num_roles`` makes global batch ``g``.

- **Indexed sources** (``megatron``, ``tokens``) have random access: a source's row ``j`` is
  tokens ``j * (T + 1) ...`` of its epoch-shuffled document stream. So the k-th global batch is
  the same whatever the DP degree and the number of workers, and a resume at another layout
  continues the same sequence.
- **Streamed sources** (``text``, tokenised in the workers; ``shards``) are read in order: each
  consumer (DP rank x worker role) reads its own disjoint share of the files or shards, and its
  cursor is part of the loader state. Resume is exact at the same layout; another DP degree or
  worker count is refused while a streamed source is in the mixture (docs/data.md).

The loader state is the schedule (rows so far, rows per source, the round robin's credits) at
the last consumed batch plus each role's stream cursors.

Legend: B batch per rank, T seq_len, S sources.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from data.formats import (
    FORMATS,
    TEXT_SUFFIXES,
    IndexedDocuments,
    MegatronDocuments,
    SkipCount,
    SourceError,
    TokenArrayDocuments,
    expand_paths,
    text_records,
    tokenize_batch,
)

log = logging.getLogger(__name__)
WEIGHT_SCALE = 1_000_000  # weights become integers: the schedule is exact on any machine


@dataclass
class SourceSpec:
    """One ``[[data.mixture]]`` table."""

    name: str
    format: str
    path: str
    weight: float
    text_field: str = "text"  # text: the JSON field (or parquet column) holding the document
    dtype: str = ""  # tokens: the dtype of a raw .bin (uint16, uint32, int32, int64)
    val_path: str = ""  # held-out documents of this source (same format): val_loss/<name>
    optional: bool = False  # a missing path drops the source with a warning instead of an error

    @property
    def indexed(self) -> bool:
        return self.format in ("megatron", "tokens")


def parse_mixture(entries: list) -> list[SourceSpec]:
    """``data.mixture`` as specs; a bad table raises ``ValueError`` naming the source and field."""
    known = {f.name for f in fields(SourceSpec)}
    specs: list[SourceSpec] = []
    for position, entry in enumerate(entries):
        where = f"data.mixture[{position}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: each source is a [[data.mixture]] table, got {entry!r}")
        missing = [k for k in ("name", "format", "path", "weight") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (every source needs them)")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {', '.join(sorted(known))}")
        spec = SourceSpec(**entry)
        where = f"data.mixture {spec.name!r}"
        if spec.format not in FORMATS:
            raise ValueError(f"{where}: format {spec.format!r}; use one of {', '.join(FORMATS)}")
        weight = spec.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{where}: weight {weight!r} must be a positive number")
        if not math.isfinite(float(weight)):
            raise ValueError(f"{where}: weight {weight!r} must be finite")
        if any(s.name == spec.name for s in specs):
            raise ValueError(f"{where}: two sources share the name; names must be unique")
        specs.append(spec)
    return specs


def present(specs: list[SourceSpec]) -> list[SourceSpec]:
    """The sources to read: an ``optional`` one whose path is missing is dropped with a warning
    (the demo's prose, where its Debian package could not be fetched)."""
    from pathlib import Path

    kept = []
    for spec in specs:
        if spec.optional:
            where = Path(spec.path)
            found = (where / "train.index.json").is_file() if spec.format == "shards" else None
            if found is None:
                try:
                    expand_paths(spec.name, spec.path)
                    found = True
                except SourceError:
                    found = spec.format == "megatron" and Path(spec.path + ".idx").is_file()
            if not found:
                log.warning(
                    "data.mixture %r: %s is missing; the optional source is left out",
                    spec.name,
                    spec.path,
                )
                continue
        kept.append(spec)
    if not kept:
        raise SourceError("data.mixture: every source is missing")
    return kept


def with_default_val(specs: list[SourceSpec]) -> list[SourceSpec]:
    """A ``shards`` source without ``val_path`` is validated on its own folder's val split."""
    from pathlib import Path

    out = []
    for s in specs:
        if s.format == "shards" and not s.val_path and (Path(s.path) / "val.index.json").is_file():
            s = SourceSpec(**{**asdict(s), "val_path": s.path})
        out.append(s)
    return out


def identity(specs: list[SourceSpec]) -> list[dict]:
    """What a checkpoint pins of the mixture: names, formats and paths (weights may change)."""
    return [{"name": s.name, "format": s.format, "path": s.path} for s in specs]


def _name_seed(name: str) -> int:
    return zlib.crc32(name.encode())


# ----- the schedule ------------------------------------------------------------------------------


@dataclass
class ScheduleState:
    """Global rows assigned so far, per source, and the round robin's integer credits."""

    rows: int = 0
    counts: list[int] = field(default_factory=list)
    credits: list[int] = field(default_factory=list)


class Schedule:
    """Smooth weighted round robin (each row: every source gains its weight, the richest source
    is chosen and pays the total)."""

    def __init__(self, weights: list[float]):
        self.weights = [max(1, round(w / sum(weights) * WEIGHT_SCALE)) for w in weights]
        self.total = sum(self.weights)

    def start(self) -> ScheduleState:
        count = len(self.weights)
        return ScheduleState(0, [0] * count, [0] * count)

    def advance(self, state: ScheduleState, num_rows: int) -> list[tuple[int, int]]:
        """The next ``num_rows`` rows as ``(source, that source's row index)``; ``state``
        moves past them."""
        out = []
        credits, counts = state.credits, state.counts
        for _ in range(num_rows):
            for i, w in enumerate(self.weights):
                credits[i] += w
            chosen = max(range(len(credits)), key=credits.__getitem__)
            credits[chosen] -= self.total
            out.append((chosen, counts[chosen]))
            counts[chosen] += 1
        state.rows += num_rows
        return out


# ----- rows of one source ------------------------------------------------------------------------


class IndexedRows:
    """Random-access rows of an indexed source's epoch-shuffled document stream."""

    def __init__(self, docs: IndexedDocuments, row_len: int, seed: int, shuffle: bool = True):
        self.docs, self.row_len, self.seed, self.shuffle = docs, row_len, seed, shuffle
        self.epoch_tokens = int(docs.lengths.sum())
        if self.epoch_tokens == 0:
            raise SourceError(f"data.mixture {docs.name!r} holds no tokens")
        self._cached: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, end offset of each of them) of ``epoch``."""
        if epoch not in self._cached:
            count = len(self.docs)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, _name_seed(self.docs.name), epoch])
                order = rng.permutation(count)
            else:
                order = np.arange(count)
            ends = np.cumsum(self.docs.lengths[order])
            self._cached = {epoch: (order, ends)}  # one epoch at a time: rows move forward
        return self._cached[epoch]

    def epoch_of(self, row: int) -> int:
        return row * self.row_len // self.epoch_tokens

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``index``: tokens ``[T+1]`` and a distinct key per document ``[T+1]``."""
        tokens = np.empty(self.row_len, dtype=np.int64)
        keys = np.empty(self.row_len, dtype=np.int64)
        offset, filled = index * self.row_len, 0
        while filled < self.row_len:
            epoch, within = divmod(offset, self.epoch_tokens)
            order, ends = self._epoch(epoch)
            slot = int(np.searchsorted(ends, within, side="right"))
            doc = self.docs.document(int(order[slot]))
            start = within - (int(ends[slot]) - doc.size)
            take = min(doc.size - start, self.row_len - filled)
            tokens[filled : filled + take] = doc[start : start + take]
            keys[filled : filled + take] = epoch * len(self.docs) + slot
            filled, offset = filled + take, offset + take
        return tokens, keys


class Exhausted(Exception):
    """A single-pass (validation) stream has no more rows."""


@dataclass
class StreamState:
    epoch: int = 0
    unit_pos: int = 0  # index into this consumer's units (files or shard parts) of the epoch
    doc_pos: int = 0  # documents of that unit already packed whole
    token_pos: int = 0  # tokens of the next document already packed
    key: int = 0  # documents started so far (a distinct key per document)


class StreamRows:
    """Rows packed in order from one consumer's share of a streamed source.

    ``units(epoch)`` lists the consumer's units (a text file, a shard part) for an epoch;
    ``docs(unit, epoch, first)`` yields the unit's documents from index ``first``.
    """

    def __init__(self, name: str, units, docs, row_len: int, state: StreamState | None = None):
        self.name, self.units, self.docs, self.row_len = name, units, docs, row_len
        self.state = StreamState(**asdict(state)) if state else StreamState()
        self._iter = None
        self._pending: np.ndarray | None = None
        self._empty_epochs, self._read_this_epoch = 0, False
        self.single_pass = False  # validation: StopIteration at the end of epoch 0

    def _next_doc(self) -> np.ndarray:
        s = self.state
        while True:
            if self._iter is None:
                units = self.units(s.epoch)
                if s.unit_pos >= len(units):
                    self._end_epoch()
                    continue
                self._iter = iter(self.docs(units[s.unit_pos], s.epoch, s.doc_pos))
            doc = next(self._iter, None)
            if doc is None:
                self._iter, s.unit_pos, s.doc_pos = None, s.unit_pos + 1, 0
                continue
            self._read_this_epoch = True
            return doc

    def _end_epoch(self) -> None:
        """The share ran out: its next epoch begins (refused when two in a row were empty)."""
        s = self.state
        self._empty_epochs = 0 if self._read_this_epoch else self._empty_epochs + 1
        if self._empty_epochs >= 2:
            raise SourceError(
                f"data.mixture {self.name!r}: this consumer's share holds no documents (fewer "
                "files than DP ranks x loader workers, or empty files)"
            )
        if self.single_pass:
            raise Exhausted(self.name)
        self._read_this_epoch = False
        s.epoch, s.unit_pos, s.doc_pos = s.epoch + 1, 0, 0
        log.info("data.mixture %r: epoch %d begins", self.name, s.epoch)

    def next_row(self) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.empty(self.row_len, dtype=np.int64)
        keys = np.empty(self.row_len, dtype=np.int64)
        s, filled = self.state, 0
        while filled < self.row_len:
            if self._pending is None:
                self._pending = self._next_doc()
            doc = self._pending
            take = min(doc.size - s.token_pos, self.row_len - filled)
            tokens[filled : filled + take] = doc[s.token_pos : s.token_pos + take]
            keys[filled : filled + take] = s.key
            filled, s.token_pos = filled + take, s.token_pos + take
            if s.token_pos == doc.size:
                self._pending, s.token_pos = None, 0
                s.doc_pos, s.key = s.doc_pos + 1, s.key + 1
        return tokens, keys


def text_units(spec: SourceSpec, path: str, seed: int, consumer: int, consumers: int, shuffle):
    """``units(epoch)`` of a text source: its files in a seeded order per epoch, dealt to the
    consumers; with fewer files than consumers each file is split by record index."""
    files = expand_paths(spec.name, path, TEXT_SUFFIXES)
    parts = max(1, -(-consumers // len(files)))
    units = [(f, p, parts) for f in files for p in range(parts)]

    def units_of(epoch: int) -> list:
        order = list(range(len(units)))
        if shuffle:
            np.random.default_rng([seed, _name_seed(spec.name), epoch]).shuffle(order)
        return [units[i] for i in order[consumer::consumers]]

    return units_of


def text_docs(spec: SourceSpec, tokenizer, skips: SkipCount, batch: int = 64):
    """``docs(unit, epoch, first)`` of a text source: records tokenised ``batch`` at a time."""

    def docs(unit, epoch: int, first: int):
        path, part, parts = unit
        pending, kept = [], 0
        for index, text in enumerate(text_records(path, spec.text_field, skips)):
            if index % parts != part:
                continue
            kept += 1
            if kept <= first:  # already packed before a resume: skipped untokenised
                continue
            pending.append(text)
            if len(pending) == batch:
                yield from tokenize_batch(tokenizer, pending)
                pending = []
        if pending:
            yield from tokenize_batch(tokenizer, pending)

    return docs


def open_indexed(spec: SourceSpec, path: str, eos_id: int) -> IndexedDocuments:
    if spec.format == "megatron":
        return MegatronDocuments(spec.name, path, eos_id)
    files = expand_paths(spec.name, path, (".npy", ".bin"))
    if len(files) != 1:
        raise SourceError(
            f"data.mixture {spec.name!r}: a tokens source is one .npy or .bin file; {path!r} "
            f"matches {len(files)} (give one [[data.mixture]] table per file)"
        )
    return TokenArrayDocuments(spec.name, files[0], eos_id, spec.dtype)


def shard_units(spec: SourceSpec, path: str, stream_kwargs: dict, consumer: int, consumers: int):
    """``(units, docs)`` of a ``shards`` source: today's shard folders, parts dealt as the
    single-folder loader deals them."""
    from data.dataset import PackedShardStream

    stream = PackedShardStream(path, **{**stream_kwargs, "role": consumer, "num_roles": consumers})

    def docs(unit, epoch: int, first: int):
        return iter(stream._docs(unit, epoch)[first:])

    return stream.role_parts, docs


def source_rows(
    spec,
    path,
    *,
    split,
    row_len,
    seed,
    shuffle,
    consumer,
    consumers,
    tokenizer,
    eos_id,
    skips,
    shard_kwargs,
    state=None,
):
    """The rows of one source for one consumer: ``IndexedRows`` or ``StreamRows``."""
    if spec.indexed:
        return IndexedRows(open_indexed(spec, path, eos_id), row_len, seed, shuffle)
    if spec.format == "text":
        units = text_units(spec, path, seed, consumer, consumers, shuffle)
        docs = text_docs(spec, tokenizer, skips)
    else:
        units, docs = shard_units(spec, path, {**shard_kwargs, "split": split}, consumer, consumers)
    return StreamRows(spec.name, units, docs, row_len, state)


def check_resumable(specs: list[SourceSpec], saved: dict | None, same_roles: bool) -> None:
    """Refuse a checkpoint of another mixture (by source name, format or path); warn when only
    the weights changed; refuse another worker or rank layout while a streamed source needs its
    per-role cursors."""
    if saved is None:
        raise ValueError(
            "the checkpoint's loader read one data folder, not a data.mixture: resume without "
            "[[data.mixture]], or start a new run (checkpoint.initial_load_path)"
        )
    now = {s["name"]: s for s in identity(specs)}
    before = {s["name"]: s for s in saved["sources"]}
    if list(now) != list(before):
        raise ValueError(
            f"the checkpoint's data.mixture has sources {list(before)}, the config {list(now)}: "
            "resume with the same sources in the same order"
        )
    for name, source in now.items():
        changed = [k for k in ("format", "path") if source[k] != before[name][k]]
        if changed:
            raise ValueError(
                f"data.mixture {name!r}: {', '.join(changed)} differ from the checkpoint's "
                f"({before[name]}); resume with the source it was trained on"
            )
    weights = [s.weight for s in specs]
    if weights != list(saved["weights"]):
        log.warning(
            "data.mixture weights changed from %s to %s: the new weights apply from the next batch",
            saved["weights"],
            weights,
        )
    streamed = [s.name for s in specs if not s.indexed]
    if streamed and not same_roles:
        raise ValueError(
            f"data.mixture sources {streamed} are read in per-worker order; resume with the "
            "checkpoint's data.num_workers (indexed sources alone resume at any layout)"
        )


def check_sources(specs: list[SourceSpec], tokenizer, strict: bool = False) -> None:
    """Open every source (and its ``val_path``) against the run's tokenizer before training:
    refuse ids beyond the vocabulary, a dtype too narrow for it, a missing ``.idx``, a path that
    matches nothing, an empty source."""
    from data.formats import check_ids
    from data.shards import load_index

    eos = tokenizer.eos_id
    if eos is None or eos < 0:
        raise SourceError(
            "data.mixture needs a tokenizer with an EOS id (documents are split and packed at it)"
        )
    for spec in specs:
        for path, split in ((spec.path, "train"), (spec.val_path, "val")):
            if not path:
                continue
            if spec.indexed:
                docs = open_indexed(spec, path, eos)
                check_ids(spec.name, docs.max_id(), tokenizer.vocab_size, docs.dtype)
            elif spec.format == "text":
                files = expand_paths(spec.name, path, TEXT_SUFFIXES)
                skips = SkipCount(spec.name, strict)
                if not any(next(text_records(f, spec.text_field, skips), None) for f in files):
                    raise SourceError(
                        f"data.mixture {spec.name!r}: {path!r} holds no {spec.text_field!r} text"
                    )
            else:
                try:
                    load_index(path, split)
                except FileNotFoundError as err:
                    raise SourceError(
                        f"data.mixture {spec.name!r}: {err}. A shards source is a data.prepare "
                        "folder (`python -m data.prepare --out DIR`; --by_source writes one per "
                        "source of a corpus)"
                    ) from err
