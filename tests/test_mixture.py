"""Data at pretraining scale (data/formats.py, data/mixture.py, data/mixture_stream.py): every
reader against an independent read, the blend's token shares, one global order whatever the DP
degree and worker count, exact resume, and every bad input refused by name."""

from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pytest
import torch

from data.formats import SkipCount, SourceError, text_records
from data.loader import StatefulLoader
from data.mixture import check_sources, parse_mixture
from data.mixture_stream import MixtureStream
from data.tokenizer import load_tokenizer

EOS = 2
VOCAB = 1000


def _megatron(prefix, docs, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_item(torch.from_numpy(np.asarray(doc, dtype=np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _docs(seed, count, low, high, eos_every=1):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        doc = rng.integers(low, high, int(rng.integers(5, 90)))
        out.append(np.append(doc, EOS) if i % eos_every == 0 else doc)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    a = _megatron(root / "a", _docs(0, 150, 3, 500, eos_every=2))  # ids 3..499
    b_docs = _docs(1, 200, 500, VOCAB)  # ids 500..999
    np.save(root / "b.npy", np.concatenate(b_docs).astype(np.int32))
    return root, a, str(root / "b.npy")


def _specs(a, b, wa=0.25, wb=0.75):
    return parse_mixture(
        [
            {"name": "a", "format": "megatron", "path": a, "weight": wa},
            {"name": "b", "format": "tokens", "path": b, "weight": wb},
        ]
    )


def _stream(specs, batch=4, dp_rank=0, dp=1, role=0, roles=1):
    return MixtureStream(
        specs,
        batch,
        32,
        VOCAB,
        tokenizer_path="",
        eos_id=EOS,
        dp_rank=dp_rank,
        dp_degree=dp,
        role=role,
        num_roles=roles,
    )


# ----- readers ----------------------------------------------------------------------------------


def test_megatron_documents_are_what_megatron_core_reads(sources):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data.formats import MegatronDocuments

    _, a, _ = sources
    ours, theirs = MegatronDocuments("a", a, EOS), IndexedDataset(a)
    assert len(ours) == len(theirs) == 150
    for i in range(len(ours)):
        want = np.asarray(theirs[i], dtype=np.int64)
        want = want if want[-1] == EOS else np.append(want, EOS)  # every document ends with EOS
        assert np.array_equal(ours.document(i), want), i
        assert ours.lengths[i] == want.size


@pytest.mark.parametrize("kind", ["npy", "bin"])
def test_token_arrays_split_at_eos(tmp_path, kind):
    from data.formats import TokenArrayDocuments

    array = np.concatenate(_docs(2, 40, 3, 60000, eos_every=1) + [np.array([7, 8, 9])])
    if kind == "npy":
        np.save(tmp_path / "t.npy", array.astype(np.uint32))
        docs = TokenArrayDocuments("t", str(tmp_path / "t.npy"), EOS)
    else:
        array.astype(np.uint16).tofile(tmp_path / "t.bin")
        docs = TokenArrayDocuments("t", str(tmp_path / "t.bin"), EOS, "uint16")
    pieces = [p for p in np.split(array, np.flatnonzero(array == EOS) + 1) if p.size]
    assert len(docs) == len(pieces) == 41
    for i, piece in enumerate(pieces):
        want = piece if piece[-1] == EOS else np.append(piece, EOS)
        assert np.array_equal(docs.document(i), want), i


def _write_text(folder, records):
    """The same records as .jsonl, .jsonl.gz, .jsonl.zst and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    (folder / "r.jsonl").write_bytes(lines)
    (folder / "r.jsonl.gz").write_bytes(gzip.compress(lines))
    (folder / "r.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    texts = [r.get("text") for r in records if isinstance(r, dict)]
    pq.write_table(
        pa.table({"text": [t if isinstance(t, str) else None for t in texts]}), folder / "r.parquet"
    )


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_text_records_and_tokens_are_the_tokenizer_on_the_records(corpus, tmp_path, suffix):
    from data.formats import tokenize_batch

    records = [{"text": f"def f{i}(x):\n    return x + {i}\n", "id": i} for i in range(30)]
    _write_text(tmp_path, records)
    tok = load_tokenizer(corpus / "tokenizer.model")
    texts = list(text_records(str(tmp_path / f"r.{suffix}"), "text", SkipCount("t")))
    assert texts == [r["text"] for r in records]
    for got, text in zip(tokenize_batch(tok, texts), texts, strict=True):
        assert got.tolist() == tok.encode(text) + [tok.eos_id]


def test_malformed_records_are_skipped_and_counted_or_refused_when_strict(tmp_path, caplog):
    lines = ['{"text": "one"}', "{not json", '{"body": "no text field"}', '{"text": "two"}']
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    skips = SkipCount("web")
    with caplog.at_level(logging.WARNING):
        assert list(text_records(str(tmp_path / "r.jsonl"), "text", skips)) == ["one", "two"]
    assert skips.count == 2
    assert sum("data/skipped/web" in r.message for r in caplog.records) == 1  # one warning
    with pytest.raises(SourceError, match="not a JSON line.*data.strict"):
        list(text_records(str(tmp_path / "r.jsonl"), "text", SkipCount("web", strict=True)))


def test_the_document_index_counts_skipped_records_and_strict_refuses_them(corpus, tmp_path):
    lines = ['{"text": "one"}', "{not json", '{"body": "no text field"}', '{"text": "two"}']
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    tok = load_tokenizer(corpus / "tokenizer.model")
    specs = parse_mixture([{"name": "web", "format": "text", "path": str(tmp_path), "weight": 1}])
    with pytest.raises(SourceError, match="not a JSON line.*data.strict"):
        check_sources(specs, tok, strict=True, index_dir=tmp_path / "strict")
    assert check_sources(specs, tok, index_dir=tmp_path / "index") == {"web": 2}
    stream = MixtureStream(
        specs,
        1,
        4,
        tok.vocab_size,
        tokenizer_path=tok.path,
        eos_id=tok.eos_id,
        index_dir=str(tmp_path / "index"),
    )
    assert next(stream.batches())[1]["skipped"] == {"web": 2}  # data/skipped/web


def test_the_index_built_ahead_holds_each_records_token_count(corpus, tmp_path, capsys):
    """``python -m launch.doc_index`` over a job config: every text file counted, each count the
    tokenizer's (plus EOS) on that record, and a second run counts nothing."""
    from data.doc_index import load, text_entries
    from launch.doc_index import main

    records = [f"record {i} " * (1 + i % 5) for i in range(30)]
    for part in range(2):
        body = "".join(json.dumps({"text": r}) + "\n" for r in records[part::2])
        (tmp_path / f"t{part}.jsonl").write_text(body)
    index = tmp_path / "index"
    config = tmp_path / "job.toml"
    config.write_text(
        f"""[data]
tokenizer = "{corpus / "tokenizer.model"}"
index_dir = "{index}"

[[data.mixture]]
name = "web"
format = "text"
path = "{tmp_path / "t*.jsonl"}"
weight = 1
"""
    )
    main(["--config", str(config), "--workers", "1"])
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first == {"files": 2, "counted": 2, "missing": 0, "dir": str(index)}
    tok = load_tokenizer(corpus / "tokenizer.model")
    for part, entry in enumerate(
        text_entries("web", str(tmp_path / "t*.jsonl"), "text", tok.identity)
    ):
        lengths, skipped = load(entry, index)
        want = [len(tok.encode(r)) + 1 for r in records[part::2]]
        assert lengths.tolist() == want and skipped == 0
    main(["--config", str(config), "--workers", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counted"] == 0


# ----- the mixture ------------------------------------------------------------------------------


def test_blend_shares_follow_the_weights_and_every_token_comes_from_its_source(sources):
    _, a, b = sources
    stream = _stream(_specs(a, b), batch=8).batches()
    counts = np.zeros(2)
    for _ in range(200):
        batch, state = next(stream)
        for row, source in zip(batch.tokens, state["row_sources"], strict=True):
            content = row[row != EOS]
            low, high = (3, 500) if source == 0 else (500, VOCAB)
            assert ((content >= low) & (content < high)).all()  # ids of its own source only
            counts[source] += row.size
    shares = counts / counts.sum()
    assert abs(shares[0] - 0.25) <= 0.02 and abs(shares[1] - 0.75) <= 0.02
    assert state["epochs"]["a"] >= 1  # the small source ran out and began its next epoch


@pytest.mark.parametrize("weights", [(1, 2, 1), (1, 2, 3, 5, 9)])
def test_shares_of_three_and_five_sources_follow_unequal_weights(tmp_path, weights):
    """Each source holds ids of its own range, so the rows' own tokens say where they came
    from: the share of rows (and of tokens) of every source is its weight's, not what the
    schedule reports."""
    width = (VOCAB - 3) // len(weights)
    specs = []
    for i, weight in enumerate(weights):
        docs = _docs(10 + i, 120, 3 + i * width, 3 + (i + 1) * width)
        np.save(tmp_path / f"s{i}.npy", np.concatenate(docs).astype(np.int32))
        specs.append(
            {
                "name": f"s{i}",
                "format": "tokens",
                "path": str(tmp_path / f"s{i}.npy"),
                "weight": weight,
            }
        )
    stream = _stream(parse_mixture(specs), batch=8).batches()
    rows = np.zeros(len(weights))
    for _ in range(150):
        batch, _ = next(stream)
        for row in batch.tokens:
            content = row[row != EOS]
            owner = (content - 3) // width
            assert content.size and (owner == owner[0]).all()  # one source per row
            rows[int(owner[0])] += 1
    want = np.asarray(weights) / sum(weights)
    assert np.abs(rows / rows.sum() - want).max() <= 0.01, (rows / rows.sum(), want)


def _global_batches(specs, dp, roles, count, batch_per_rank, state=None, **kwargs):
    """The first ``count`` global batches as the loader of each rank would consume them."""
    per_rank = []
    for rank in range(dp):
        loader = StatefulLoader(
            dict(
                specs=specs,
                batch_size=batch_per_rank,
                seq_len=32,
                vocab_size=VOCAB,
                tokenizer_path="",
                eos_id=EOS,
                dp_rank=rank,
                dp_degree=dp,
            )
            | kwargs,
            num_workers=0 if roles == 1 else roles,
        )
        if state is not None:
            loader.load_state_dict(state)
        per_rank.append([next(loader).tokens for _ in range(count)])
        loader.close()
    saved = loader.state_dict()
    return [torch.cat([r[i] for r in per_rank]) for i in range(count)], saved


def test_the_global_order_is_the_same_at_any_dp_degree_and_worker_count(sources):
    _, a, b = sources
    specs = _specs(a, b)
    one, _ = _global_batches(specs, 1, 1, 6, 8)
    two, saved = _global_batches(specs, 2, 2, 3, 4)
    for i in range(3):
        assert torch.equal(one[i], two[i]), i
    # stopped at 2 ranks x 2 workers after 3 batches, resumed at 1 rank: the same sequence
    resumed, _ = _global_batches(specs, 1, 1, 3, 8, {**saved, "other_layout": True})
    for i in range(3):
        assert torch.equal(resumed[i], one[3 + i]), i


def test_a_changed_mixture_is_refused_and_new_weights_warn(sources, caplog):
    _, a, b = sources
    _, saved = _global_batches(_specs(a, b), 1, 1, 2, 4)
    renamed = parse_mixture(
        [
            {"name": "a", "format": "megatron", "path": a, "weight": 1},
            {"name": "c", "format": "tokens", "path": b, "weight": 1},
        ]
    )
    with pytest.raises(ValueError, match=r"sources \['a', 'b'\], the config \['a', 'c'\]"):
        _global_batches(renamed, 1, 1, 1, 4, saved)
    with caplog.at_level(logging.WARNING):
        _global_batches(_specs(a, b, 0.5, 0.5), 1, 1, 1, 4, saved)
    assert any("weights changed" in r.message for r in caplog.records)


def _text_and_shards(corpus, root, sources):
    """A megatron, a text (JSON lines in 3 files) and a shards source (the corpus itself)."""
    _, a, _ = sources
    for part in range(3):
        records = [{"text": f"line {part} {i} " * (3 + i % 7)} for i in range(40)]
        (root / f"t{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return parse_mixture(
        [
            {"name": "a", "format": "megatron", "path": a, "weight": 1},
            {"name": "web", "format": "text", "path": str(root / "t*.jsonl"), "weight": 2},
            {"name": "code", "format": "shards", "path": str(corpus), "weight": 1},
        ]
    )


def test_text_and_shards_follow_the_global_order_and_resume_at_another_layout(
    corpus, tmp_path, sources
):
    tok = load_tokenizer(corpus / "tokenizer.model")
    specs = _text_and_shards(corpus, tmp_path, sources)
    assert check_sources(specs, tok) == {"a": 0, "web": 0, "code": 0}  # builds the index
    extra = dict(tokenizer_path=str(corpus / "tokenizer.model"), vocab_size=tok.vocab_size)
    one, _ = _global_batches(specs, 1, 1, 6, 8, **extra)
    two, saved = _global_batches(specs, 2, 2, 3, 4, **extra)
    for i in range(3):
        assert torch.equal(one[i], two[i]), i
    resumed, _ = _global_batches(specs, 1, 1, 3, 8, {**saved, "other_layout": True}, **extra)
    for i in range(3):
        assert torch.equal(resumed[i], one[3 + i]), i
    # a resume in the same process from a mid-epoch state: exactly the uninterrupted batches
    kwargs = dict(tokenizer_path=extra["tokenizer_path"], eos_id=tok.eos_id)
    straight = MixtureStream(specs, 4, 32, tok.vocab_size, **kwargs).batches()
    want = [next(straight) for _ in range(12)]
    again = MixtureStream(specs, 4, 32, tok.vocab_size, **kwargs).batches(want[5][1])
    for i in range(6, 12):
        assert np.array_equal(next(again)[0].tokens, want[i][0].tokens), i


def test_indexed_text_and_shards_are_the_records_tokenised_and_the_shards_read(
    corpus, tmp_path, sources
):
    from data.block_docs import ShardDocuments, TextDocuments
    from data.doc_index import default_dir, shard_entries, text_entries
    from data.formats import tokenize_batch
    from data.shards import load_index, read_shard

    tok = load_tokenizer(corpus / "tokenizer.model")
    specs = _text_and_shards(corpus, tmp_path, sources)
    check_sources(specs, tok)
    where = default_dir()
    entries = text_entries("web", str(tmp_path / "t*.jsonl"), "text", tok.identity)
    texts = [t for e in entries for t in text_records(e.location, "text", SkipCount("web"))]
    docs = TextDocuments("web", entries, where, tok)
    assert len(docs) == len(texts) == 120
    order = docs.permutation(np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(120))
    for i in order:  # read in an epoch's order: each file once, windows in memory
        assert docs.document(int(i)).tolist() == tokenize_batch(tok, [texts[i]])[0].tolist()
    want = []
    for shard in load_index(corpus, "train")["shards"]:
        want += [d.tokens for d in read_shard(str(corpus / shard["name"]), tok.vocab_size)]
    shards = ShardDocuments("code", shard_entries("code", str(corpus), "train"), where, 1000)
    assert len(shards) == len(want)
    for i in shards.permutation(np.random.default_rng(1))[:200]:
        assert np.array_equal(shards.document(int(i)), want[i])
    # a file that changed after its index was built is named, with the fix
    (tmp_path / "t1.jsonl").write_text(json.dumps({"text": "short"}) + "\n")
    stale = TextDocuments("web", entries, where, tok)  # the entries of the old file
    with pytest.raises(SourceError, match="t1.jsonl holds fewer records than its document index"):
        for i in range(len(stale)):
            stale.document(i)


# ----- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry, message",
    [
        (dict(format="megatron", path="x", weight=1), "missing name"),
        (dict(name="s", format="csv", path="x", weight=1), "format 'csv'"),
        (dict(name="s", format="tokens", path="x", weight=0), "weight 0 must be a positive"),
        (dict(name="s", format="tokens", path="x", weight=1, colour=2), "unknown keys"),
    ],
)
def test_bad_tables_name_the_source_and_field(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_mixture([entry])


def test_bad_sources_are_refused_before_training(corpus, tmp_path, sources):
    _, a, _ = sources
    tok = load_tokenizer(corpus / "tokenizer.model")  # 1,000 ids

    def check(entry):
        check_sources(parse_mixture([{"name": "s", "weight": 1, **entry}]), tok)

    with pytest.raises(SourceError, match=r"s\.idx is missing"):
        (tmp_path / "s.bin").write_bytes(b"")
        check(dict(format="megatron", path=str(tmp_path / "s")))
    with pytest.raises(SourceError, match="matches no file"):
        check(dict(format="text", path=str(tmp_path / "nothing*.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SourceError, match="hold no 'text' text"):
        check(dict(format="text", path=str(tmp_path / "empty.jsonl")))
    np.save(tmp_path / "big.npy", np.array([5, 1200, EOS], dtype=np.int32))
    with pytest.raises(SourceError, match="token id 1200, beyond the tokenizer's 1000"):
        check(dict(format="tokens", path=str(tmp_path / "big.npy")))
    wide = load_tokenizer(corpus / "tokenizer.model")
    wide.__class__ = type("Wide", (type(tok),), {"vocab_size": property(lambda self: 70000)})
    with pytest.raises(SourceError, match="stores uint16 ids"):
        check_sources(
            parse_mixture([{"name": "s", "weight": 1, "format": "megatron", "path": a}]), wide
        )


# ----- preparation --------------------------------------------------------------------------------


def _prepared_docs(folder, split):
    from data.shards import load_index, read_shard

    out = {}
    for shard in load_index(folder, split)["shards"]:
        for doc in read_shard(str(folder / shard["name"]), VOCAB):
            out[doc.doc_id] = doc.tokens.tolist()
    return out


def test_prepare_in_parallel_and_in_parts_gives_the_same_corpus(corpus, tmp_path):
    from data.prepare import main, merge, prepare

    src = corpus.parent / "src"  # the conftest corpus's inputs
    common = dict(sources=(), inputs=[str(src)], tokenizer_path=str(corpus / "tokenizer.model"))
    prepare(tmp_path / "one", **common, shard_bytes=32 << 10, val_per_mille=100)
    prepare(tmp_path / "two", **common, shard_bytes=32 << 10, val_per_mille=100, workers=2)
    for i in range(2):
        prepare(
            tmp_path / f"part{i}",
            **common,
            shard_bytes=32 << 10,
            val_per_mille=100,
            num_shards=2,
            shard_index=i,
        )
    merge(tmp_path / "merged", [tmp_path / "part1", tmp_path / "part0"])
    for split in ("train", "val"):
        want = _prepared_docs(tmp_path / "one", split)
        assert want and _prepared_docs(tmp_path / "two", split) == want
        assert _prepared_docs(tmp_path / "merged", split) == want
    manifests = [
        json.loads((tmp_path / f / "manifest.json").read_text()) for f in ("one", "merged")
    ]
    for split in ("train", "val"):  # the shard cut differs; documents and tokens do not
        counts = [{k: m["splits"][split][k] for k in ("documents", "tokens")} for m in manifests]
        assert counts[0] == counts[1]
    with pytest.raises(ValueError, match="each of 0..1 once"):
        merge(tmp_path / "bad", [tmp_path / "part0"])
    with pytest.raises(SystemExit):  # parts must share a tokenizer they are given
        main(
            [
                "--out",
                str(tmp_path / "x"),
                "--sources",
                "",
                "--input",
                str(src),
                "--num_shards",
                "2",
            ]
        )


def test_prepare_writes_megatron_pairs_that_megatron_core_and_the_mixture_read(corpus, tmp_path):
    from data.formats import MegatronDocuments
    from data.prepare import prepare

    src = corpus.parent / "src"
    common = dict(sources=(), inputs=[str(src)], tokenizer_path=str(corpus / "tokenizer.model"))
    prepare(tmp_path / "shards", **common, val_per_mille=100)
    prepare(tmp_path / "mg", **common, val_per_mille=100, workers=2, output_format="megatron")
    want = _prepared_docs(tmp_path / "shards", "train")
    docs = MegatronDocuments("mg", str(tmp_path / "mg" / "train_text_document"), EOS)
    assert [docs.document(i).tolist() for i in range(len(docs))] == [want[k] for k in sorted(want)]


def test_text_and_shards_sources_served_over_http_train(corpus, tmp_path, sources):
    import functools
    import http.server
    import shutil
    import threading

    from pretrain.config import load_config
    from pretrain.train import Trainer
    from tests.test_trainer import _overrides

    records = [{"text": f"def f{i}(x):\n    return x * {i}\n" * 4} for i in range(200)]
    (tmp_path / "web.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shutil.copytree(corpus, tmp_path / "served")  # a data.prepare folder behind a URL
    host = f"http://127.0.0.1:{server.server_address[1]}"
    url = f"{host}/web.jsonl"
    _, a, _ = sources
    mixture = (
        f'--data.mixture=[{{name = "web", format = "text", path = "{url}", weight = 1, '
        f'val_path = "{url}"}}, {{name = "code", format = "megatron", path = "{a}", weight = 1}}, '
        f'{{name = "served", format = "shards", path = "{host}/served", weight = 1}}]'
    )
    try:
        trainer = Trainer(
            load_config(
                "pretrain/configs/debug.toml",
                _overrides(corpus, tmp_path / "run", steps=3, workers=0)
                + [mixture, "--checkpoint.enable=false", "--lr_scheduler.warmup_steps=1"],
            )
        )
        summary = trainer.fit()
    finally:
        server.shutdown()
    assert summary["step"] == 3 and np.isfinite(summary["val_loss"])
    assert set(trainer.validator.per_source) == {"web"}
    scalars = trainer.data_scalars()
    assert scalars["data/tokens/web"] > 0 and scalars["data/tokens/served"] > 0
