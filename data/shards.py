"""Token shards: webdataset tar files of tokenized documents, plus a shard index.

A sample is one document: ``<key>.tokens.npy`` (uint16 or uint32 token ids, EOS appended) and
``<key>.json`` (document id, source key). Shards are cut by bytes. ``index.json`` lists every shard
with its document and token counts and sha256, so a missing or wrong path fails before training.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class ShardSetWriter:
    """Writes ``{prefix}-{n:05d}.tar`` shards of at most ``shard_bytes`` each, and their index."""

    def __init__(self, folder: Path, prefix: str, vocab_size: int, shard_bytes: int = 4 << 20):
        import webdataset as wds

        self._wds = wds
        self.folder, self.prefix, self.shard_bytes = Path(folder), prefix, shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.shards: list[dict] = []
        self._writer = None
        self._current: dict | None = None

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):05d}.tar"
        self._current = {"name": name, "num_docs": 0, "num_tokens": 0}
        self._writer = self._wds.TarWriter(str(self.folder / name))

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        path = self.folder / self._current["name"]
        self._current["bytes"] = path.stat().st_size
        self._current["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        self.shards.append(self._current)
        self._writer = self._current = None

    def write(self, doc_id: int, key: str, tokens: np.ndarray) -> None:
        if self._writer is None:
            self._open()
        buffer = io.BytesIO()
        np.save(buffer, tokens.astype(self.dtype))
        self._writer.write(
            {
                "__key__": f"{doc_id:010d}",
                "tokens.npy": buffer.getvalue(),
                "json": json.dumps({"doc_id": doc_id, "key": key}).encode(),
            }
        )
        self._current["num_docs"] += 1
        self._current["num_tokens"] += int(tokens.size)
        if (self.folder / self._current["name"]).stat().st_size >= self.shard_bytes:
            self._close()

    def finish(self) -> dict:
        self._close()
        index = {
            "prefix": self.prefix,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "shards": self.shards,
        }
        (self.folder / f"{self.prefix}.index.json").write_text(json.dumps(index, indent=1))
        return index


@dataclass
class ShardDoc:
    doc_id: int
    tokens: np.ndarray


class CorruptShardError(RuntimeError):
    pass


def read_shard(url: str, vocab_size: int) -> list[ShardDoc]:
    """All documents of one shard (a local path or any URL webdataset's ``gopen`` supports).

    Raises ``CorruptShardError`` for a truncated or unreadable tar, and ``ValueError`` naming the
    shard
    and document when a token id is at or beyond ``vocab_size``.
    """
    import webdataset as wds

    samples: dict[str, dict[str, bytes]] = {}
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise CorruptShardError(f"shard {url} is truncated or corrupt: {err}") from err
    docs = []
    for key in sorted(samples):
        parts = samples[key]
        if "tokens.npy" not in parts or "json" not in parts:
            raise CorruptShardError(f"shard {url}: sample {key} lacks tokens.npy or json")
        try:
            tokens = np.load(io.BytesIO(parts["tokens.npy"]), allow_pickle=False)
            meta = json.loads(parts["json"])
        except (ValueError, OSError) as err:
            raise CorruptShardError(f"shard {url}: sample {key} cannot be decoded: {err}") from err
        if tokens.size and int(tokens.max()) >= vocab_size:
            raise ValueError(
                f"shard {url}, document {meta['doc_id']} ({meta.get('key')}): token id "
                f"{int(tokens.max())} "
                f">= vocab size {vocab_size}; the shards were written with another tokenizer; "
                "re-run data.prepare or fix data.tokenizer"
            )
        docs.append(ShardDoc(int(meta["doc_id"]), tokens.astype(np.int64)))
    return docs


def load_index(folder: str | Path, split: str) -> dict:
    """The shard index of a split, with a clear error when it or a listed shard is missing."""
    folder = Path(folder)
    path = folder / f"{split}.index.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no shard index {path}; run `python -m data.prepare --out {folder}` or fix "
            "data.dataset_path"
        )
    index = json.loads(path.read_text())
    missing = [s["name"] for s in index["shards"] if not (folder / s["name"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shards listed in {path} are missing: {missing[:5]} (of {len(missing)})"
        )
    if not index["shards"]:
        raise ValueError(f"shard index {path} lists no shards: the {split} split is empty")
    return index
