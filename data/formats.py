"""Readers of the corpora users bring: Megatron indexed datasets, flat token arrays and raw text.

Each reader gives documents as int64 token arrays that end with the tokenizer's EOS, as our own
shards do, so packing and document masks treat every source alike.

- ``megatron``: ``<prefix>.bin`` + ``<prefix>.idx`` through megatron-core's ``IndexedDataset``
  (memory-mapped; a document is its ``document_indices`` range of sequences).
- ``tokens``: a ``.npy`` array, or a raw ``.bin`` of a stated dtype (nanoGPT, OLMo/Dolma), split
  into documents after every EOS id (memory-mapped).
- ``text``: ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, ``.parquet`` or plain text; records are
  read lazily, file by file, and tokenised in batches. A malformed JSON line or a record without
  the text field is skipped and counted (``strict``: an error).

Legend: D documents, N tokens.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMATS = ("shards", "megatron", "tokens", "text")
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt", ".text", ".md")
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32, "int64": np.int64}


class SourceError(ValueError):
    """A source that cannot be read as configured; the message names it and the fix."""


def expand_paths(name: str, path: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files of ``path``: a file, a folder (its files with ``suffixes``, recursively), or a glob.
    URLs (``pipe:``, ``http(s)://``) pass through."""
    if path.startswith(("pipe:", "http://", "https://")):
        return [path]
    found = Path(path)
    if found.is_file():
        return [str(found)]
    if found.is_dir():
        files = sorted(
            str(p) for p in found.rglob("*") if p.is_file() and str(p).endswith(suffixes or ("",))
        )
    else:
        files = sorted(p for p in glob.glob(path, recursive=True) if Path(p).is_file())
    if not files:
        raise SourceError(
            f"data.mixture {name!r}: path {path!r} matches no file; give a file, a folder or a glob"
        )
    return files


def check_ids(name: str, max_id: int, vocab_size: int, dtype=None) -> None:
    """Refuse token ids the run's tokenizer does not have, or a dtype too narrow for it."""
    if dtype is not None and np.issubdtype(dtype, np.integer):
        top = np.iinfo(dtype).max
        if vocab_size - 1 > top:
            raise SourceError(
                f"data.mixture {name!r} stores {np.dtype(dtype).name} ids (at most {top}) but the "
                f"tokenizer has {vocab_size} ids: its ids were cut when it was written; rebuild it "
                "with a wider dtype (uint32 or int32)"
            )
    if max_id >= vocab_size:
        raise SourceError(
            f"data.mixture {name!r} holds token id {max_id}, beyond the tokenizer's {vocab_size} "
            "ids: it was tokenized with another tokenizer; point data.tokenizer at that one"
        )


def _ends_with_eos(doc: np.ndarray, eos_id: int) -> np.ndarray:
    doc = np.asarray(doc, dtype=np.int64)
    if doc.size and doc[-1] == eos_id:
        return doc
    return np.append(doc, np.int64(eos_id))


class IndexedDocuments:
    """Documents with known lengths and random access (``megatron``, ``tokens``; ``text`` and
    ``shards`` through their document index, ``data.block_docs``)."""

    name: str
    lengths: np.ndarray  # [D] tokens per document, EOS included

    def __len__(self) -> int:
        return int(self.lengths.size)

    def document(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def permutation(self, rng: np.random.Generator) -> np.ndarray:
        """An epoch's document order."""
        return rng.permutation(len(self))


class MegatronDocuments(IndexedDocuments):
    """A Megatron/NeMo indexed dataset (``<prefix>.bin`` / ``<prefix>.idx``), via megatron-core.

    A document is the sequences between consecutive ``document_indices``; an EOS is appended
    when the document does not end with one (Megatron's ``--append-eod`` already does).
    """

    def __init__(self, name: str, prefix: str, eos_id: int):
        prefix = prefix.removesuffix(".bin").removesuffix(".idx")
        for suffix in (".idx", ".bin"):
            if not Path(prefix + suffix).is_file():
                raise SourceError(
                    f"data.mixture {name!r}: {prefix + suffix} is missing; a megatron source is "
                    "the prefix of a .bin/.idx pair (path = 'dir/name' for dir/name.bin)"
                )
        self.name, self.eos_id = name, eos_id
        self.dataset = megatron_indexed().IndexedDataset(prefix, mmap=True)
        self.dtype = np.dtype(self.dataset.index.dtype)
        self.tokens = np.memmap(prefix + ".bin", dtype=self.dtype, mode="r")  # the whole .bin
        self._bounds = np.asarray(self.dataset.document_indices, dtype=np.int64)  # [D + 1]
        seq_len = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)
        seq_start = np.asarray(self.dataset.index.sequence_pointers, dtype=np.int64)
        seq_start = seq_start // self.dtype.itemsize  # bytes -> tokens
        self._seq_start, self._seq_len = seq_start, seq_len
        cumulative = np.concatenate([[0], np.cumsum(seq_len)])
        raw = cumulative[self._bounds[1:]] - cumulative[self._bounds[:-1]]
        if raw.size == 0 or raw.sum() == 0:
            raise SourceError(f"data.mixture {name!r}: {prefix}.idx lists no tokens")
        # a document's last token: the end of its last non-empty sequence
        last_seq = self._bounds[1:] - 1
        last_token = self.tokens[np.maximum(seq_start[last_seq] + seq_len[last_seq] - 1, 0)]
        missing_eos = (raw == 0) | (np.asarray(last_token, dtype=np.int64) != eos_id)
        self.lengths = raw + missing_eos.astype(np.int64)

    def document(self, index: int) -> np.ndarray:
        lo, hi = int(self._bounds[index]), int(self._bounds[index + 1])
        parts = [
            self.tokens[self._seq_start[i] : self._seq_start[i] + self._seq_len[i]]
            for i in range(lo, hi)
        ]
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return _ends_with_eos(tokens, self.eos_id)

    def max_id(self) -> int:
        return _chunked_max(self.tokens)


def megatron_indexed():
    """megatron-core's ``indexed_dataset`` module (``IndexedDataset``, ``IndexedDatasetBuilder``),
    imported without its notes that Transformer Engine and Apex are absent (they are not needed
    for data) and without its INFO lines."""
    import warnings

    logging.getLogger("megatron").setLevel(logging.WARNING)  # its import logs its FSDP set-up
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    except ImportError as err:
        raise ImportError(
            "megatron sources need megatron-core: pip install -e '.[megatron]'"
        ) from err
    return indexed_dataset


def _chunked_max(array: np.ndarray, chunk: int = 1 << 26) -> int:
    top = -1
    for start in range(0, array.size, chunk):
        part = array[start : start + chunk]
        if part.size:
            top = max(top, int(part.max()))
    return top


class TokenArrayDocuments(IndexedDocuments):
    """A flat token array, ``.npy`` or raw ``.bin`` of ``dtype``, split after every EOS."""

    def __init__(self, name: str, path: str, eos_id: int, dtype: str = ""):
        self.name, self.eos_id = name, eos_id
        if path.endswith(".npy"):
            array = np.load(path, mmap_mode="r")
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
                raise SourceError(
                    f"data.mixture {name!r}: {path} holds {array.dtype}{array.shape}; a tokens "
                    "source is a 1-D integer array"
                )
        else:
            if dtype not in _DTYPES:
                raise SourceError(
                    f"data.mixture {name!r}: a raw token file ({path}) needs dtype = one of "
                    f"{', '.join(_DTYPES)} (nanoGPT writes uint16)"
                )
            array = np.memmap(path, dtype=_DTYPES[dtype], mode="r")
        if array.size == 0:
            raise SourceError(f"data.mixture {name!r}: {path} holds no tokens")
        self.array, self.dtype = array, array.dtype
        ends = _eos_positions(array, eos_id) + 1  # one past each EOS
        if ends.size == 0 or ends[-1] != array.size:
            ends = np.append(ends, array.size)  # a last document without EOS
        self._starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        self._ends = ends.astype(np.int64)
        self.lengths = self._ends - self._starts
        self.lengths[-1] += int(array[-1] != eos_id)  # the EOS added to the last

    def document(self, index: int) -> np.ndarray:
        return _ends_with_eos(self.array[self._starts[index] : self._ends[index]], self.eos_id)

    def max_id(self) -> int:
        return _chunked_max(self.array)


def _eos_positions(array: np.ndarray, eos_id: int, chunk: int = 1 << 26) -> np.ndarray:
    found = []
    for start in range(0, array.size, chunk):
        found.append(np.flatnonzero(array[start : start + chunk] == eos_id) + start)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


# ----- text ------------------------------------------------------------------------------------


@dataclass
class SkipCount:
    """Records skipped from a text source: malformed JSON, or no text field."""

    name: str
    strict: bool = False
    quiet: bool = False  # count without the warning (a second read of what the index counted)
    count: int = 0

    def skip(self, where: str, why: str) -> None:
        if self.strict:
            raise SourceError(
                f"data.mixture {self.name!r}: {where}: {why} (data.strict = true makes this an "
                "error; set it false to skip and count such records)"
            )
        if self.count == 0 and not self.quiet:
            log.warning(
                "data.mixture %r: %s: %s; skipping such records (counted as data/skipped/%s)",
                self.name,
                where,
                why,
                self.name,
            )
        self.count += 1


def _open_text(path: str) -> io.TextIOBase:
    if path.startswith(("pipe:", "http://", "https://")):
        stream = _open_url(path)
        if path.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=stream)
        elif path.endswith(".zst"):
            stream = _zstd_reader(stream)
        return io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if path.endswith(".zst"):
        return io.TextIOWrapper(_zstd_reader(open(path, "rb")), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _open_url(path: str):
    """A binary stream of ``pipe:COMMAND`` (its standard output) or an ``http(s)://`` URL."""
    if path.startswith("pipe:"):
        import subprocess

        return subprocess.Popen(path[5:], shell=True, stdout=subprocess.PIPE).stdout
    import urllib.request

    try:
        return urllib.request.urlopen(path, timeout=60)
    except OSError as err:
        raise SourceError(f"{path}: {err}; check the URL and that the server is reachable") from err


def _zstd_reader(raw):
    try:
        import zstandard
    except ImportError as err:
        raise ImportError("jsonl.zst sources need zstandard: pip install zstandard") from err
    return zstandard.ZstdDecompressor().stream_reader(raw)


def text_records(path: str, field: str, skips: SkipCount) -> Iterator[str]:
    """The texts of one file, in file order (JSON lines: ``field`` of each record; parquet: the
    ``field`` column; anything else: the whole file is one document)."""
    if path.endswith(".parquet"):
        yield from _parquet_texts(path, field, skips)
        return
    json_lines = ".jsonl" in path or path.endswith(".json")
    with _open_text(path) as handle:
        if not json_lines:
            text = handle.read()
            if text.strip():
                yield text
            return
        for number, line in enumerate(handle, 1):
            if not line.strip():  # a blank line is no record
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skips.skip(f"{path}:{number}", "not a JSON line")
                continue
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                skips.skip(f"{path}:{number}", f"no string field {field!r}")
                continue
            if value.strip():  # an empty text is no document
                yield value


def _parquet_texts(path: str, field: str, skips: SkipCount) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("parquet sources need pyarrow: pip install pyarrow") from err
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise SourceError(
            f"{path} has no column {field!r} (columns: {', '.join(table.schema_arrow.names)}); "
            "set text_field in its [[data.mixture]] table"
        )
    for group in range(table.num_row_groups):
        for value in table.read_row_group(group, columns=[field]).column(0).to_pylist():
            if isinstance(value, str):
                if value.strip():
                    yield value
            else:
                skips.skip(path, f"a row whose {field!r} is not text")


def tokenize_batch(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token arrays (EOS-terminated) of ``texts``, encoded in one batch where the tokenizer can."""
    encode = getattr(tokenizer, "encode_batch", None)
    ids = encode(texts) if encode is not None else [tokenizer.encode(t) for t in texts]
    eos = tokenizer.eos_id
    return [np.asarray([*one, eos], dtype=np.int64) for one in ids]
