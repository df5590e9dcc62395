"""``python -m data.prepare --out DIR``: build a real corpus offline, its tokenizer and its shards.

With no options it builds the demo corpus (CPython stdlib source + the Python docs when apt can
fetch them), trains a ~16k sentencepiece BPE on the train split, writes webdataset shards for the
train and validation splits, and a ``manifest.json`` with file hashes, document counts and token
counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import time
from pathlib import Path

from tqdm import tqdm

from data.shards import ShardSetWriter
from data.sources import SourceStats, debian_documents, stdlib_documents, user_documents
from data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
DEFAULT_SOURCES = ("stdlib", "pydoc")


def is_validation(key: str, val_per_mille: int) -> bool:
    """Stable document-level split by a hash of the document's key."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 1000 < val_per_mille


def collect_documents(sources, inputs, cache: Path, val_per_mille: int):
    """Deduplicated ``(train, val, stats)`` document lists."""
    stats: dict[str, SourceStats] = {}
    seen: set[str] = set()
    train, val = [], []
    duplicates = 0
    generators = []
    for name in sources:
        stats[name] = SourceStats()
        if name == "stdlib":
            generators.append(stdlib_documents(stats[name]))
        else:
            generators.append(debian_documents(name, cache, stats[name]))
    for path in inputs:
        stats.setdefault("user", SourceStats())
        generators.append(user_documents(Path(path), stats["user"]))
    for gen in generators:
        for doc in gen:
            if not doc.text.strip():
                stats[doc.source].empty_skipped += 1
                continue
            digest = hashlib.sha256(doc.text.encode("utf-8", errors="replace")).hexdigest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            (val if is_validation(doc.key, val_per_mille) else train).append(doc)
    return train, val, stats, duplicates


def train_sentencepiece(docs, out_prefix: Path, vocab_size: int, seed: int, max_lines: int) -> Path:
    import sentencepiece as spm

    lines = [line for doc in docs for line in doc.text.splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    sample = out_prefix.with_suffix(".train.txt")
    sample.write_text("\n".join(lines[:max_lines]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(sample),
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        user_defined_symbols=["\n", "\t", "    "],
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        max_sentence_length=8192,
        num_threads=2,
        minloglevel=2,
        pad_id=3,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        input_sentence_size=max_lines,
    )
    sample.unlink()
    return out_prefix.with_suffix(".model")


def write_split(docs, tokenizer, out: Path, split: str, shard_bytes: int, first_id: int) -> dict:
    import numpy as np

    writer = ShardSetWriter(out, split, tokenizer.vocab_size, shard_bytes)
    batch = 256
    for start in tqdm(
        range(0, len(docs), batch), desc=f"tokenize {split}", unit="batch", leave=False
    ):
        chunk = docs[start : start + batch]
        for i, (doc, ids) in enumerate(zip(chunk, tokenizer.encode_batch([d.text for d in chunk]))):
            tokens = np.asarray(ids + [tokenizer.eos_id], dtype=np.int64)
            writer.write(first_id + start + i, doc.key, tokens)
    return writer.finish()


def prepare(
    out: Path,
    sources=DEFAULT_SOURCES,
    inputs=(),
    vocab_size: int = 16000,
    tokenizer_path: str | None = None,
    shard_bytes: int = 4 << 20,
    val_per_mille: int = 20,
    seed: int = 0,
    max_spm_lines: int = 400_000,
) -> dict:
    """Build the corpus in ``out``; returns the manifest."""
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    train, val, stats, duplicates = collect_documents(sources, inputs, out / "raw", val_per_mille)
    if not train or not val:
        raise ValueError(
            f"the corpus has {len(train)} train and {len(val)} validation documents; "
            "add sources or inputs (both splits need documents)"
        )
    log.info(
        "collected %d train / %d val documents (%d duplicates removed)",
        len(train),
        len(val),
        duplicates,
    )
    if tokenizer_path is None:
        log.info("training a %d-piece sentencepiece BPE on the train split", vocab_size)
        tokenizer_path = str(
            train_sentencepiece(train, out / "tokenizer", vocab_size, seed, max_spm_lines)
        )
    tokenizer = load_tokenizer(tokenizer_path)
    train_index = write_split(train, tokenizer, out, "train", shard_bytes, 0)
    val_index = write_split(val, tokenizer, out, "val", shard_bytes, len(train))
    manifest = {
        "tokenizer": str(Path(tokenizer_path).resolve()),
        "tokenizer_identity": tokenizer.identity,
        "vocab_size": tokenizer.vocab_size,
        "sources": {
            name: {
                "files": s.files,
                "bytes": s.bytes,
                "replaced_non_utf8": s.replaced_non_utf8,
                "empty_skipped": s.empty_skipped,
                "files_sha256": hashlib.sha256(
                    json.dumps(s.file_hashes, sort_keys=True).encode()
                ).hexdigest(),
            }
            for name, s in stats.items()
        },
        "duplicates_removed": duplicates,
        "splits": {
            split: {
                "documents": sum(s["num_docs"] for s in idx["shards"]),
                "tokens": sum(s["num_tokens"] for s in idx["shards"]),
                "shards": len(idx["shards"]),
            }
            for split, idx in (("train", train_index), ("val", val_index))
        },
        "seconds": round(time.time() - started, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--sources",
        default=",".join(DEFAULT_SOURCES),
        help="comma list of stdlib, pydoc, linux-doc, perl-doc, git-doc, fortunes ('' = none)",
    )
    parser.add_argument(
        "--input", action="append", default=[], help="text/JSONL file or folder (repeat)"
    )
    parser.add_argument("--vocab_size", type=int, default=16000)
    parser.add_argument(
        "--tokenizer", default=None, help="use this .model/tokenizer.json, do not train"
    )
    parser.add_argument("--shard_bytes", type=int, default=4 << 20)
    parser.add_argument("--val_per_mille", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sources = [s for s in ns.sources.split(",") if s]
    manifest = prepare(
        ns.out,
        sources,
        ns.input,
        ns.vocab_size,
        ns.tokenizer,
        ns.shard_bytes,
        ns.val_per_mille,
        ns.seed,
    )
    print(json.dumps(manifest["splits"]), f"in {manifest['seconds']} s -> {ns.out}")


if __name__ == "__main__":
    main()
