"""Weighted mixtures of sources: ``[[data.mixture]]`` tables, read in one global order.

Every source yields rows of ``seq_len + 1`` tokens packed from its own documents (EOS-terminated,
in its own seeded, shuffled order, epoch after epoch). The mixture decides the source of each
global row with a smooth weighted round robin on integer weights: deterministic on any machine,
and every window of n rows holds each source's share to within one row.

Global row ``k`` belongs to global batch ``k // (B * dp)``; data-parallel rank ``r`` takes rows
``r * B .. (r + 1) * B`` of it, and loader worker role ``g % num_roles`` makes global batch ``g``.

Every source has random access: its row ``j`` is tokens ``j * (T + 1) ...`` of its epoch-shuffled
document stream. Megatron and token arrays store their document lengths; ``text`` and ``shards``
sources get theirs from the document index (``data.doc_index``, counted once and cached) and are
read block by block (``data.block_docs``). So the k-th global batch is the same whatever the DP
degree and the number of workers, and a resume at another layout continues the same sequence.

The loader state is the schedule (rows so far, rows per source, the round robin's credits) at
the last consumed batch.

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
    IndexedDocuments,
    MegatronDocuments,
    SourceError,
    TokenArrayDocuments,
    expand_paths,
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
    """Random-access rows of a source's epoch-shuffled document stream."""

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
                order = self.docs.permutation(rng)
            else:
                order = np.arange(count)
            ends = np.cumsum(self.docs.lengths[order])
            self._cached = {epoch: (order, ends)}  # one epoch at a time: rows move forward
            if epoch > 0 and self.shuffle:
                log.info("data.mixture %r: reading epoch %d", self.docs.name, epoch)
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


NEEDS_INDEX = ("text", "shards")  # formats whose document lengths come from data.doc_index


def open_documents(
    spec: SourceSpec, path: str, split: str, eos_id: int, tokenizer=None, index_dir=None
) -> IndexedDocuments:
    """The documents of one source (``split``: which of a shards folder's manifests to read;
    ``tokenizer`` and ``index_dir``: for the ``NEEDS_INDEX`` formats)."""
    if spec.format == "megatron":
        return MegatronDocuments(spec.name, path, eos_id)
    if spec.format in NEEDS_INDEX:
        from data.block_docs import open_block_documents

        return open_block_documents(spec, path, split, index_dir, tokenizer)
    files = expand_paths(spec.name, path, (".npy", ".bin"))
    if len(files) != 1:
        raise SourceError(
            f"data.mixture {spec.name!r}: a tokens source is one .npy or .bin file; {path!r} "
            f"matches {len(files)} (give one [[data.mixture]] table per file)"
        )
    return TokenArrayDocuments(spec.name, files[0], eos_id, spec.dtype)


def check_resumable(specs: list[SourceSpec], saved: dict | None) -> None:
    """Refuse a checkpoint of another mixture (by source name, format or path); warn when only
    the weights changed."""
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


def check_sources(
    specs: list[SourceSpec],
    tokenizer,
    strict: bool = False,
    *,
    index_dir=None,
    workers: int = 1,
    rank: int = 0,
    world: int = 1,
) -> dict[str, int]:
    """Build the document index where it is missing (``data.doc_index``: each rank a share, with
    ``workers`` processes), then open every source (and its ``val_path``) against the run's
    tokenizer: refuse ids beyond the vocabulary, a dtype too narrow for it, a missing ``.idx``, a
    path that matches nothing, an empty source. Returns the records skipped per source."""
    from data.doc_index import default_dir, ensure
    from data.formats import check_ids

    eos = tokenizer.eos_id
    if eos is None or eos < 0:
        raise SourceError(
            "data.mixture needs a tokenizer with an EOS id (documents are split and packed at it)"
        )
    directory = default_dir(index_dir or "")
    ensure(specs, tokenizer, directory, strict=strict, workers=workers, rank=rank, world=world)
    skipped = {}
    for spec in specs:
        for path, split in ((spec.path, "train"), (spec.val_path, "val")):
            if not path:
                continue
            docs = open_documents(spec, path, split, eos, tokenizer, directory)
            if spec.format in ("megatron", "tokens"):
                check_ids(spec.name, docs.max_id(), tokenizer.vocab_size, docs.dtype)
            if split == "train":
                skipped[spec.name] = getattr(docs, "skipped", 0)
    return skipped
