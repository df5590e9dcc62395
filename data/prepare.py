"""``python -m data.prepare --out DIR``: build a real corpus offline, its tokenizer and its shards.

With no options it builds the demo corpus (CPython stdlib source + the Python docs when apt can
fetch them), trains a ~16k sentencepiece BPE on a sample of the train split
(``--tokenizer_sample_bytes``), writes webdataset shards for the train and validation splits, and
a ``manifest.json`` with file hashes, document counts and token counts.

At scale: ``--workers N`` tokenises in N processes; ``--num_shards K --shard_index I`` keeps every
K-th document (one task of a slurm array; the tokenizer must be given) and
``python -m data.prepare merge --out DIR PART...`` combines the parts; ``--format megatron``
writes ``{split}_text_document.bin/.idx`` with megatron-core's builder, which Megatron-LM reads
too. Each part logs its tokens/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path

from tqdm import tqdm

from data.formats import megatron_indexed, tokenize_batch
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


def train_sentencepiece(
    docs, out_prefix: Path, vocab_size: int, seed: int, sample_bytes: int
) -> Path:
    """A BPE trained on a seeded sample of about ``sample_bytes`` of the documents' lines."""
    import sentencepiece as spm

    lines = [line for doc in docs for line in doc.text.splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    kept, size = [], 0
    for line in lines:
        if size >= sample_bytes:
            break
        kept.append(line)
        size += len(line.encode("utf-8", errors="replace")) + 1
    max_lines = len(kept)
    sample = out_prefix.with_suffix(".train.txt")
    sample.write_text("\n".join(kept), encoding="utf-8")
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


def _tokenize_part(args) -> tuple[dict, int, float]:
    """One worker's contiguous part of a split: tokenise and write it (shards, or a Megatron
    ``.bin``/``.idx`` pair). Returns ``(index, tokens, seconds)``."""
    docs, ids, tokenizer_path, out, prefix, shard_bytes, output_format = args
    import numpy as np

    started = time.time()
    tokenizer = load_tokenizer(tokenizer_path)
    if output_format == "megatron":
        import torch

        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
        builder = megatron_indexed().IndexedDatasetBuilder(str(out / f"{prefix}.bin"), dtype=dtype)
    else:
        writer = ShardSetWriter(out, prefix, tokenizer.vocab_size, shard_bytes)
    total, batch = 0, 256
    for start in range(0, len(docs), batch):
        chunk = docs[start : start + batch]
        encoded = tokenize_batch(tokenizer, [d.text for d in chunk])
        for i, (doc, tokens) in enumerate(zip(chunk, encoded, strict=True)):
            total += tokens.size
            if output_format == "megatron":
                builder.add_item(torch.from_numpy(tokens))
                builder.end_document()
            else:
                writer.write(ids[start + i], doc.key, tokens)
    if output_format == "megatron":
        builder.finalize(str(out / f"{prefix}.idx"))
        index = {"prefix": prefix, "documents": len(docs), "tokens": total}
    else:
        index = writer.finish()
        (out / f"{prefix}.index.json").unlink()  # the split's index is written once, whole
    return index, total, time.time() - started


def write_split(
    docs,
    tokenizer_path: str,
    out: Path,
    split: str,
    shard_bytes: int,
    ids: list[int],
    workers: int = 1,
    output_format: str = "shards",
    name: str = "",
) -> dict:
    """Tokenise a split in ``workers`` processes (contiguous parts, in order) and write it.

    ``name`` tells the files of one ``--shard_index`` apart (merged later). Shards: one
    ``{split}.index.json`` listing every worker's shards in document order. Megatron: one
    ``{split}_text_document.bin/.idx`` (the workers' parts merged by megatron-core).
    """
    parts = max(1, min(workers, len(docs)))
    size = -(-len(docs) // parts)
    jobs = []
    for w in range(parts):
        prefix = split + name + (f"-w{w:03d}" if parts > 1 else "")
        if output_format == "megatron" and parts == 1:
            prefix = f"{split}_text_document"  # written where it belongs: nothing to merge
        lo = w * size
        jobs.append(
            (
                docs[lo : lo + size],
                ids[lo : lo + size],
                tokenizer_path,
                out,
                prefix,
                shard_bytes,
                output_format,
            )
        )
    if parts == 1:
        results = [_tokenize_part(jobs[0])]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(parts) as pool:
            results = list(
                tqdm(
                    pool.imap(_tokenize_part, jobs),
                    total=parts,
                    desc=f"tokenize {split}",
                    leave=False,
                )
            )
    for w, (_, tokens, seconds) in enumerate(results):
        log.info(
            "%s part %d: %d tokens in %.1f s (%.0f tokens/s)",
            split,
            w,
            tokens,
            seconds,
            tokens / max(seconds, 1e-9),
        )
    if output_format == "megatron":
        return _merge_megatron(out, split, [r[0]["prefix"] for r in results], results)
    index = {
        **results[0][0],
        "prefix": split,
        "shards": [s for r in results for s in r[0]["shards"]],
    }
    (out / f"{split}.index.json").write_text(json.dumps(index, indent=1))
    return index


def _merge_megatron(
    out: Path, stem: str, prefixes: list[str], results, keep_parts: bool = False
) -> dict:
    """One ``{stem}_text_document`` pair from parts (in order; prefixes relative to ``out`` or
    absolute); the parts are deleted unless ``keep_parts``."""
    target = f"{stem}_text_document"
    if prefixes != [target]:
        indexed = megatron_indexed()
        dtype = indexed.IndexedDataset(str(out / prefixes[0])).index.dtype
        builder = indexed.IndexedDatasetBuilder(str(out / f"{target}.bin"), dtype=dtype)
        for prefix in prefixes:
            builder.add_index(str(out / prefix))
        builder.finalize(str(out / f"{target}.idx"))
        for prefix in [] if keep_parts else prefixes:
            for suffix in (".bin", ".idx"):
                (out / f"{prefix}{suffix}").unlink()
    documents = sum(r[0]["documents"] for r in results)
    tokens = sum(r[1] for r in results)
    shards = [{"name": f"{target}.bin", "num_docs": documents, "num_tokens": tokens}]
    return {"prefix": target, "format": "megatron", "shards": shards}


def prepare(
    out: Path,
    sources=DEFAULT_SOURCES,
    inputs=(),
    vocab_size: int = 16000,
    tokenizer_path: str | None = None,
    shard_bytes: int = 4 << 20,
    val_per_mille: int = 20,
    seed: int = 0,
    tokenizer_sample_bytes: int = 64 << 20,
    workers: int = 1,
    num_shards: int = 1,
    shard_index: int = 0,
    output_format: str = "shards",
    by_source: bool = False,
) -> dict:
    """Build the corpus in ``out``; returns the manifest.

    ``workers``: tokenising processes. ``num_shards``/``shard_index``: this run keeps every
    ``num_shards``-th document of each split (a slurm array splits one corpus; ``merge``
    combines the parts; the tokenizer must be given). ``output_format``: ``shards``
    (webdataset) or ``megatron`` (``{split}_text_document.bin/.idx``, readable by Megatron-LM).
    ``by_source``: also write each source's documents as a corpus of its own in
    ``out/<source>/`` (the same tokenizer and document ids), to blend them with ``data.mixture``.
    """
    started = time.time()
    if output_format not in ("shards", "megatron"):
        raise ValueError(f"--format {output_format!r}: use shards or megatron")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard_index {shard_index} must be in [0, --num_shards={num_shards})")
    if num_shards > 1 and tokenizer_path is None:
        raise ValueError(
            "--num_shards > 1 needs --tokenizer: every part must use one tokenizer (train it "
            "once with a single-process run, then pass its tokenizer.model to every part)"
        )
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
        log.info("training a %d-piece sentencepiece BPE on a sample of the train split", vocab_size)
        tokenizer_path = str(
            train_sentencepiece(train, out / "tokenizer", vocab_size, seed, tokenizer_sample_bytes)
        )
    tokenizer = load_tokenizer(tokenizer_path)
    name = f"-s{shard_index:04d}" if num_shards > 1 else ""
    indexes, tokens = {}, 0
    for split, docs, first in (("train", train, 0), ("val", val, len(train))):
        ids = list(range(first, first + len(docs)))[shard_index::num_shards]  # whole-corpus ids
        index = write_split(
            docs[shard_index::num_shards],
            tokenizer_path,
            out,
            split,
            shard_bytes,
            ids,
            workers,
            output_format,
            name,
        )
        indexes[split] = index
        tokens += sum(sh["num_tokens"] for sh in index["shards"])
        if by_source:
            for source in sorted({d.source for d in docs}):
                keep = [i for i, d in enumerate(docs) if d.source == source][
                    shard_index::num_shards
                ]
                write_split(
                    [docs[i] for i in keep],
                    tokenizer_path,
                    out / source,
                    split,
                    shard_bytes,
                    [first + i for i in keep],
                    workers,
                    output_format,
                    name,
                )
    seconds = time.time() - started
    manifest = {
        "tokenizer": str(Path(tokenizer_path).resolve()),
        "tokenizer_identity": tokenizer.identity,
        "vocab_size": tokenizer.vocab_size,
        "format": output_format,
        "shard_index": [shard_index, num_shards],
        "by_source": sorted(stats) if by_source else [],
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
        "splits": _split_counts(indexes),
        "seconds": round(seconds, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info(
        "%d tokens in %.1f s: %.0f tokens/s per process",
        tokens,
        seconds,
        tokens / seconds / max(workers, 1),
    )
    return manifest


def _split_counts(indexes: dict) -> dict:
    return {
        split: {
            "documents": sum(s["num_docs"] for s in idx["shards"]),
            "tokens": sum(s["num_tokens"] for s in idx["shards"]),
            "shards": len(idx["shards"]),
        }
        for split, idx in indexes.items()
    }


def merge(out: Path, parts: list[Path]) -> dict:
    """Combine the outputs of ``--num_shards K --shard_index I`` runs (every I once) into one
    corpus in ``out``: shards are linked (or copied) and listed in one index per split; Megatron
    pairs are merged by megatron-core. Returns the merged manifest."""
    import shutil

    manifests = []
    for part in parts:
        if not (part / "manifest.json").is_file():
            raise ValueError(f"{part} has no manifest.json: not a finished data.prepare output")
        manifests.append(json.loads((part / "manifest.json").read_text()))
    first = manifests[0]
    for part, m in zip(parts, manifests, strict=True):
        if m["tokenizer_identity"] != first["tokenizer_identity"] or m["format"] != first["format"]:
            raise ValueError(
                f"{part} was prepared with another tokenizer or format than {parts[0]}"
            )
    count = first["shard_index"][1]
    got = sorted(m["shard_index"][0] for m in manifests)
    if got != list(range(count)):
        raise ValueError(
            f"the parts hold shard indexes {got}; merging needs each of 0..{count - 1} once"
        )
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(first["tokenizer"])
    if tokenizer.is_file() and not (out / tokenizer.name).exists():
        shutil.copyfile(tokenizer, out / tokenizer.name)
    order = sorted(range(len(parts)), key=lambda i: manifests[i]["shard_index"][0])
    indexes = {}
    for split in ("train", "val"):
        if first["format"] == "megatron":
            results = [
                (
                    {"documents": manifests[i]["splits"][split]["documents"]},
                    manifests[i]["splits"][split]["tokens"],
                )
                for i in order
            ]
            prefixes = [str(parts[i] / f"{split}_text_document") for i in order]
            indexes[split] = _merge_megatron(out, split, prefixes, results, keep_parts=True)
            continue
        shards = []
        for i in order:
            index = json.loads((parts[i] / f"{split}.index.json").read_text())
            for shard in index["shards"]:
                target = out / shard["name"]
                if not target.exists():
                    try:
                        os.link(parts[i] / shard["name"], target)
                    except OSError:
                        shutil.copyfile(parts[i] / shard["name"], target)
                shards.append(shard)
        indexes[split] = {**index, "prefix": split, "shards": shards}
        (out / f"{split}.index.json").write_text(json.dumps(indexes[split], indent=1))
    manifest = {
        **first,
        "tokenizer": str((out / tokenizer.name).resolve())
        if tokenizer.is_file()
        else first["tokenizer"],
        "shard_index": [0, 1],
        "merged_from": [str(p) for p in parts],
        "splits": _split_counts(indexes),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if argv[:1] == ["merge"]:
        merger = argparse.ArgumentParser(prog="python -m data.prepare merge")
        merger.add_argument("--out", required=True, type=Path)
        merger.add_argument("parts", nargs="+", type=Path, help="the --shard_index outputs")
        ns = merger.parse_args(argv[1:])
        manifest = merge(ns.out, ns.parts)
        print(json.dumps(manifest["splits"]), f"-> {ns.out}")
        return
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
    parser.add_argument(
        "--tokenizer_sample_bytes", type=int, default=64 << 20, help="text the BPE is trained on"
    )
    parser.add_argument("--shard_bytes", type=int, default=4 << 20)
    parser.add_argument("--val_per_mille", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes")
    parser.add_argument("--num_shards", type=int, default=1, help="parts of a slurm array")
    parser.add_argument("--shard_index", type=int, default=0, help="this part (0-based)")
    parser.add_argument("--format", default="shards", choices=["shards", "megatron"])
    parser.add_argument(
        "--by_source", action="store_true", help="also one corpus per source, in DIR/<source>"
    )
    ns = parser.parse_args(argv)
    sources = [s for s in ns.sources.split(",") if s]
    try:
        manifest = prepare(
            ns.out,
            sources,
            ns.input,
            ns.vocab_size,
            ns.tokenizer,
            ns.shard_bytes,
            ns.val_per_mille,
            ns.seed,
            ns.tokenizer_sample_bytes,
            ns.workers,
            ns.num_shards,
            ns.shard_index,
            ns.format,
            ns.by_source,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(json.dumps(manifest["splits"]), f"in {manifest['seconds']} s -> {ns.out}")


if __name__ == "__main__":
    main()
