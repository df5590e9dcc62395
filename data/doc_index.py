"""The document index of ``text`` and ``shards`` sources: tokens per document, counted once, cached.

A mixture reads every source in one global order (``data.mixture``): row ``j`` of a source is
tokens ``j * (T + 1) ...`` of its epoch-shuffled document stream, so the k-th global batch is the
same at any DP degree and worker count. That needs each document's token count up front.
Megatron and token arrays store it; raw text and shard folders do not, so this module counts it
on first use and caches it, one small file per input file:

- ``text``: every record is tokenised with the run's tokenizer (the loader workers tokenise again
  when they read it; the index holds counts only, 4 bytes per document). Records that the loader
  skips (malformed JSON, no text field) are skipped here and counted.
- ``shards``: the token count of every document of every shard (no tokenizer needed).

The cache key is the file (absolute path, size, modification time; a URL by its address), the
text field and the tokenizer's identity, so a changed file or another tokenizer is counted again.
The cache lives in ``data.index_dir`` (default ``$ENGRAM_CACHE/doc_index``, else
``~/.cache/engram/doc_index``); put it on a filesystem every node sees.

The trainer builds missing entries before training, each rank a share of the files with
``data.num_workers`` processes; ``python -m launch.doc_index --config CFG`` builds them ahead (a
slurm array splits it with ``--num_shards K --shard_index I``).

Legend: D documents of one file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.formats import TEXT_SUFFIXES, SkipCount, SourceError, expand_paths, text_records

log = logging.getLogger(__name__)
URL_PREFIXES = ("pipe:", "http://", "https://")


def default_dir(configured: str = "") -> Path:
    if configured:
        return Path(configured)
    if os.environ.get("ENGRAM_CACHE"):
        return Path(os.environ["ENGRAM_CACHE"]) / "doc_index"
    return Path.home() / ".cache" / "engram" / "doc_index"


@dataclass(frozen=True)
class Entry:
    """One input file of a source: ``kind`` "text" (a text file) or "shard" (a webdataset shard)."""

    source: str  # the mixture's source name (messages)
    kind: str
    location: str  # a path or URL
    field: str  # text: the JSON field / parquet column
    key: str  # the cache file's stem

    def path(self, directory: Path) -> Path:
        return directory / f"{self.key}.npz"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def text_entries(name: str, path: str, field: str, tokenizer_identity: str) -> list[Entry]:
    out = []
    for location in expand_paths(name, path, TEXT_SUFFIXES):
        if location.startswith(URL_PREFIXES):
            identity = [location]
        else:
            stat = Path(location).stat()
            identity = [str(Path(location).resolve()), stat.st_size, stat.st_mtime_ns]
        key = _key("text", *identity, field, tokenizer_identity)
        out.append(Entry(name, "text", location, field, key))
    return out


def shard_manifest(name: str, path: str, split: str) -> tuple[str, dict]:
    """(the URL or folder the shard names are relative to, the split's manifest) of a ``shards``
    source: a ``data.prepare`` folder, or its URL."""
    from data.shards import load_index

    if path.startswith(URL_PREFIXES):
        import webdataset as wds

        where = path.rstrip("/")
        try:
            with wds.gopen(f"{where}/{split}.index.json", "rb") as stream:
                return where, json.loads(stream.read())
        except (OSError, ValueError) as err:
            raise SourceError(
                f"data.mixture {name!r}: {where}/{split}.index.json cannot be read ({err}); a "
                "shards URL serves a data.prepare folder"
            ) from err
    try:
        return path, load_index(path, split)
    except (FileNotFoundError, ValueError) as err:
        raise SourceError(
            f"data.mixture {name!r}: {err}. A shards source is a data.prepare folder (`python -m "
            "data.prepare --out DIR`; --by_source writes one per source of a corpus)"
        ) from err


def shard_entries(name: str, path: str, split: str) -> list[Entry]:
    prefix, manifest = shard_manifest(name, path, split)
    out = []
    for shard in manifest["shards"]:
        content = shard.get("sha256") or [shard["name"], shard.get("bytes")]
        key = _key("shard", content)
        out.append(Entry(name, "shard", f"{prefix}/{shard['name']}", "", key))
    return out


def count(entry: Entry, tokenizer, strict: bool = False) -> tuple[np.ndarray, int]:
    """(tokens per document ``[D]`` int32, EOS included; records skipped) of one file."""
    if entry.kind == "shard":
        from data.shards import read_shard

        docs = read_shard(entry.location, tokenizer.vocab_size)
        return np.asarray([d.tokens.size for d in docs], dtype=np.int32), 0
    from data.formats import tokenize_batch

    skips = SkipCount(entry.source, strict)
    lengths, pending = [], []
    for text in text_records(entry.location, entry.field, skips):
        pending.append(text)
        if len(pending) == 256:
            lengths.extend(d.size for d in tokenize_batch(tokenizer, pending))
            pending = []
    if pending:
        lengths.extend(d.size for d in tokenize_batch(tokenizer, pending))
    return np.asarray(lengths, dtype=np.int32), skips.count


def _save(path: Path, lengths: np.ndarray, skipped: int) -> None:
    """Written under a temporary name and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, lengths=lengths, skipped=np.int64(skipped))
    os.replace(partial, path)


def load(entry: Entry, directory: Path) -> tuple[np.ndarray, int]:
    """The cached (lengths, skipped) of ``entry``; a clear error when it was never built."""
    path = entry.path(directory)
    if not path.is_file():
        raise SourceError(
            f"data.mixture {entry.source!r}: {entry.location} has no document index in "
            f"{directory}; the trainer builds it before training, or run `python -m "
            "launch.doc_index --config CFG` (data.index_dir must be the same on every node)"
        )
    with np.load(path) as saved:
        return saved["lengths"], int(saved["skipped"])


_WORKER_TOKENIZER: dict = {}


def _count_in_worker(job) -> tuple[int, int, int]:
    """A pool worker: count one file with the tokenizer it loaded once; returns (position,
    documents, tokens)."""
    position, entry, tokenizer_path, directory, strict = job
    if tokenizer_path not in _WORKER_TOKENIZER:
        from data.tokenizer import load_tokenizer

        _WORKER_TOKENIZER[tokenizer_path] = load_tokenizer(tokenizer_path)
    lengths, skipped = count(entry, _WORKER_TOKENIZER[tokenizer_path], strict)
    _save(entry.path(directory), lengths, skipped)
    return position, int(lengths.size), int(lengths.sum(dtype=np.int64))


def build(
    entries: list[Entry],
    directory: Path,
    tokenizer_path: str,
    *,
    strict: bool = False,
    workers: int = 1,
    share: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> int:
    """Count the entries of this share (``(index, count)``: every ``count``-th file from
    ``index``) that are not cached yet, in ``workers`` processes; returns how many were counted."""
    shared = list(dict.fromkeys(entries))[share[0] :: share[1]]
    mine = [e for e in shared if not e.path(directory).is_file()]
    if not mine:
        return 0
    jobs = [(i, e, tokenizer_path, directory, strict) for i, e in enumerate(mine)]
    started, docs, tokens = time.perf_counter(), 0, 0
    bar = _bar(len(mine), progress)
    if workers > 1 and len(mine) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # never fork a process with torch threads
        with ProcessPoolExecutor(min(workers, len(mine)), mp_context=context) as pool:
            for _, d, t in pool.map(_count_in_worker, jobs):
                docs, tokens = docs + d, tokens + t
                bar.update(1)
    else:
        for job in jobs:
            _, d, t = _count_in_worker(job)
            docs, tokens = docs + d, tokens + t
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    log.info(
        "document index: %d file(s), %d documents, %d tokens in %.1f s (%.0f tokens/s)",
        len(mine),
        docs,
        tokens,
        seconds,
        tokens / max(seconds, 1e-9),
    )
    return len(mine)


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="document index", unit="file", disable=not enabled)


def source_entries(spec, path: str, split: str, tokenizer_identity: str) -> list[Entry]:
    """The files of one ``text`` or ``shards`` source (other formats store their lengths)."""
    if spec.format == "text":
        return text_entries(spec.name, path, spec.text_field, tokenizer_identity)
    if spec.format == "shards":
        return shard_entries(spec.name, path, split)
    return []


def mixture_entries(specs, tokenizer_identity: str) -> list[Entry]:
    """Every file of every source of ``specs`` that needs an index, train and held-out."""
    out = []
    for spec in specs:
        for path, split in ((spec.path, "train"), (spec.val_path, "val")):
            if path:
                out.extend(source_entries(spec, path, split, tokenizer_identity))
    return out


def ensure(
    specs,
    tokenizer,
    directory: Path,
    *,
    strict: bool = False,
    workers: int = 1,
    rank: int = 0,
    world: int = 1,
) -> None:
    """Build what the mixture's index lacks: each rank a share, then a barrier; a rank that still
    misses files (a cache that is not shared between nodes) counts them itself, with a warning."""
    import torch.distributed as dist

    entries = mixture_entries(specs, tokenizer.identity)
    build(
        entries,
        directory,
        tokenizer.path,
        strict=strict,
        workers=workers,
        share=(rank, world),
        progress=rank == 0,
    )
    if world > 1 and dist.is_initialized():
        dist.barrier()
        late = build(entries, directory, tokenizer.path, strict=strict, workers=workers)
        if late:
            log.warning(
                "document index: %d file(s) counted by other ranks were not visible in %s; "
                "counted again here. Put data.index_dir on a filesystem all nodes share",
                late,
                directory,
            )
