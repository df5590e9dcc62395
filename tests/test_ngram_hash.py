"""Unit tests of the compressed tokenizer and the N-gram hasher beyond the reference cases."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from data.ngram_hash import (
    CompressedTokenizer,
    EngramHashSpec,
    NgramHasher,
    engram_head_primes,
    is_prime,
)
from data.tokenizer import load_tokenizer

FIELDS = dict(
    engram_vocab_size=[1009, 2003],
    max_ngram_size=3,
    n_head_per_ngram=4,
    layer_ids=[0, 2],
    pad_id=2,
    seed=7,
)


@pytest.fixture(scope="module")
def hasher(deepseek_compressed):
    return NgramHasher(EngramHashSpec(**FIELDS, document_reset=True), deepseek_compressed)


def _naive_hash(compressed, mult, primes, pad, max_n):
    """Straightforward per-position reference formula, used to check our vectorised hasher."""
    batch, seq = compressed.shape
    out = []
    for b in range(batch):
        row = []
        for t in range(seq):
            ids = []
            mix = None
            for k in range(max_n):
                tok = compressed[b, t - k] if t - k >= 0 else pad
                term = np.int64(tok) * mult[k]
                mix = term if mix is None else np.bitwise_xor(mix, term)
                if k >= 1:
                    ids += [int(mix % p) for p in primes[k - 1]]
            row.append(ids)
        out.append(row)
    return np.array(out, dtype=np.int64)


def test_matches_naive_formula(hasher, deepseek_compressed):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 128_000, size=(2, 17))
    got = hasher.hash(raw)
    compressed = deepseek_compressed.compress(raw)
    with np.errstate(over="ignore"):
        for layer in FIELDS["layer_ids"]:
            want = _naive_hash(
                compressed,
                hasher.multipliers[layer],
                hasher.primes[layer],
                hasher.compressed_pad_id,
                3,
            )
            np.testing.assert_array_equal(got[layer], want)


def test_primes_unique_and_prime():
    primes = engram_head_primes([1000, 1000], 3, 4, [0, 1, 5])
    flat = [p for layer in primes.values() for order in layer for p in order]
    assert len(set(flat)) == len(flat) and all(is_prime(p) for p in flat)
    assert flat == sorted(flat)  # one seen-set walked in layer, order, head order with equal bases


def test_multipliers_odd_int64(hasher):
    for mult in hasher.multipliers.values():
        assert mult.dtype == np.int64 and np.all(mult % 2 == 1)


def test_out_of_range_id_is_a_clear_error(hasher):
    with pytest.raises(ValueError, match="token id 999999 is outside the tokenizer.*128815"):
        hasher.hash(np.array([[1, 999999]]))


def test_negative_ids_pass_through(deepseek_compressed):
    out = deepseek_compressed.compress(np.array([[-1, 5]]))
    assert out[0, 0] == -1 and out[0, 1] == deepseek_compressed.lookup_table[5]


def test_document_reset(hasher):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 128_000, size=(1, 12))
    doc = np.array([[0] * 5 + [1] * 7])
    reset = hasher.hash(raw, doc_ids=doc)
    plain = hasher.hash(raw)
    alone = hasher.hash(raw[:, 5:])  # the second document hashed on its own, left-padded
    for layer in FIELDS["layer_ids"]:
        np.testing.assert_array_equal(reset[layer][:, 5:], alone[layer])
        np.testing.assert_array_equal(reset[layer][:, :5], plain[layer][:, :5])
        assert not np.array_equal(reset[layer][:, 5:7], plain[layer][:, 5:7])
    same_doc = hasher.hash(raw, doc_ids=np.zeros_like(raw))
    off = NgramHasher(EngramHashSpec(**FIELDS), hasher.compressed_tokenizer)  # the reference's way
    ignored = off.hash(raw, doc_ids=doc)
    for layer in FIELDS["layer_ids"]:
        np.testing.assert_array_equal(same_doc[layer], plain[layer])
        np.testing.assert_array_equal(ignored[layer], plain[layer])


def test_export_and_rebuild_without_tokenizer(hasher, deepseek_compressed):
    config = hasher.to_config_dict()
    rebuilt = NgramHasher.from_config_dict(config)
    raw = np.arange(40).reshape(2, 20) * 997
    compressed = deepseek_compressed.compress(raw)
    want = hasher.hash(raw)
    got = rebuilt.hash_compressed(compressed)
    for layer in FIELDS["layer_ids"]:
        np.testing.assert_array_equal(got[layer], want[layer])
    with pytest.raises(ValueError, match="without the tokenizer"):
        rebuilt.hash(raw)
    tampered = dict(config, compressed_map_sha256="0" * 64)
    with pytest.raises(ValueError, match="compressed_map_sha256"):
        NgramHasher.from_config_dict(tampered, deepseek_compressed)


def test_pickle_roundtrip(hasher):
    clone = pickle.loads(pickle.dumps(hasher))
    raw = np.arange(30).reshape(3, 10)
    for layer, ids in hasher.hash(raw).items():
        np.testing.assert_array_equal(clone.hash(raw)[layer], ids)


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(engram_vocab_size=[1000]), "one vocab base per n-gram order"),
        (dict(max_ngram_size=1, engram_vocab_size=[]), "max_ngram_size"),
        (dict(layer_ids=[1, 1]), "layer_ids"),
        (dict(n_head_per_ngram=0), "n_head_per_ngram"),
    ],
)
def test_validation_names_the_field(deepseek_compressed, override, field):
    with pytest.raises(ValueError, match=field):
        NgramHasher(EngramHashSpec(**{**FIELDS, **override}), deepseek_compressed)


def test_sentencepiece_compressed_tokenizer(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"Hello World {i} hello world HELLO café cafe" for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=60,
        model_type="bpe",
        minloglevel=2,
    )
    compressed = CompressedTokenizer.from_tokenizer(load_tokenizer(tmp_path / "sp.model"))
    assert len(compressed) < compressed.lookup_table.shape[0]  # case/accent folding merges ids
    assert compressed.lookup_table[0] == 0  # interned in first-seen order
