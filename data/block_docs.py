"""Random access to the documents of ``text`` and ``shards`` sources, through their document index.

Both are read block by block: a block is one input file (a text file, a shard). Their documents'
token counts come from ``data.doc_index``, so a source's rows are a function of their position
(``data.mixture.IndexedRows``) as for Megatron and token arrays.

The epoch order keeps reads sequential: the blocks in a seeded order, and inside each block the
documents shuffled within windows of ``window`` consecutive documents (a shard: the whole shard).
A consumer reads rows in increasing order, so it walks through each block once per epoch; it
keeps the current window's records in memory and tokenises only the documents its rows take.

Legend: D documents of the source, W documents per window.
"""

from __future__ import annotations

import numpy as np

from data.doc_index import Entry, load, source_entries
from data.formats import IndexedDocuments, SkipCount, SourceError, text_records, tokenize_batch


class BlockDocuments(IndexedDocuments):
    """Documents of consecutive blocks; ``lengths`` from the document index."""

    window: int = 0  # documents shuffled together (0: the whole block)

    def __init__(self, name: str, entries: list[Entry], directory):
        self.name, self.entries = name, entries
        loaded = [load(e, directory) for e in entries]
        self.skipped = sum(skipped for _, skipped in loaded)
        self.lengths = np.concatenate([lengths for lengths, _ in loaded]).astype(np.int64)
        self.bounds = np.concatenate([[0], np.cumsum([lengths.size for lengths, _ in loaded])])
        if self.lengths.size == 0:
            kind = entries[0].kind if entries else "shard"
            what = f"{entries[0].field!r} text" if kind == "text" else "documents"
            raise SourceError(f"data.mixture {name!r}: its files hold no {what}")

    def permutation(self, rng: np.random.Generator) -> np.ndarray:
        """Blocks in a random order, each block's documents shuffled within windows."""
        parts = []
        for block in rng.permutation(len(self.entries)):
            start, stop = int(self.bounds[block]), int(self.bounds[block + 1])
            size = stop - start
            window = np.arange(size) // (self.window or max(size, 1))
            parts.append(start + np.lexsort((rng.random(size), window)))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def document(self, index: int) -> np.ndarray:
        block = int(np.searchsorted(self.bounds, index, side="right")) - 1
        doc = self._read(block, index - int(self.bounds[block]))
        if doc.size != self.lengths[index]:
            raise SourceError(
                f"data.mixture {self.name!r}: {self.entries[block].location} changed since its "
                f"document index was built ({doc.size} tokens where the index says "
                f"{int(self.lengths[index])}); delete its index file "
                f"({self.entries[block].key}.npz) or keep the file unchanged during a run"
            )
        return doc

    def _read(self, block: int, local: int) -> np.ndarray:
        raise NotImplementedError


class TextDocuments(BlockDocuments):
    """A ``text`` source: records read file by file, tokenised when a row takes them."""

    window = 1024

    def __init__(self, name: str, entries: list[Entry], directory, tokenizer):
        super().__init__(name, entries, directory)
        self.tokenizer, self.eos_id = tokenizer, tokenizer.eos_id
        self._reader = None  # (block, record iterator, records read so far)
        self._texts: tuple[int, int, list[str]] | None = None  # (block, window, its records)
        self._tokens: dict[int, np.ndarray] = {}

    def _read(self, block: int, local: int) -> np.ndarray:
        window = local // self.window
        if self._texts is None or self._texts[:2] != (block, window):
            self._texts = (block, window, self._window_texts(block, window))
            self._tokens = {}
        if local not in self._tokens:
            text = self._texts[2][local - window * self.window]
            self._tokens[local] = tokenize_batch(self.tokenizer, [text])[0]
        return self._tokens[local]

    def _window_texts(self, block: int, window: int) -> list[str]:
        first = window * self.window
        size = int(min(self.bounds[block + 1] - self.bounds[block] - first, self.window))
        if self._reader is None or self._reader[0] != block or self._reader[2] > first:
            entry = self.entries[block]
            quiet = SkipCount(self.name, strict=False, quiet=True)  # counted by the index
            self._reader = (block, text_records(entry.location, entry.field, quiet), 0)
        _, records, position = self._reader
        for _ in range(first - position):
            next(records, None)
        texts = [t for _, t in zip(range(size), records)]
        self._reader = (block, records, first + len(texts))
        if len(texts) < size:
            raise SourceError(
                f"data.mixture {self.name!r}: {self.entries[block].location} holds fewer "
                "records than its document index: it changed since the index was built; delete "
                f"its index file ({self.entries[block].key}.npz)"
            )
        return texts


class ShardDocuments(BlockDocuments):
    """A ``shards`` source: one shard in memory at a time."""

    def __init__(self, name: str, entries: list[Entry], directory, vocab_size: int):
        super().__init__(name, entries, directory)
        self.vocab_size = vocab_size
        self._shard: tuple[int, list[np.ndarray]] | None = None

    def _read(self, block: int, local: int) -> np.ndarray:
        from data.shards import read_shard

        if self._shard is None or self._shard[0] != block:
            docs = read_shard(self.entries[block].location, self.vocab_size)
            self._shard = (block, [d.tokens for d in docs])
        return self._shard[1][local]


def open_block_documents(spec, path: str, split: str, directory, tokenizer) -> BlockDocuments:
    entries = source_entries(spec, path, split, tokenizer.identity)
    if spec.format == "text":
        return TextDocuments(spec.name, entries, directory, tokenizer)
    return ShardDocuments(spec.name, entries, directory, tokenizer.vocab_size)
