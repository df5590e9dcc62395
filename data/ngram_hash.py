"""Engram compressed tokenizer and N-gram hashing, exact against the public reference.

Implements the hashing of "Conditional Memory via Scalable Lookup: A New Axis of Sparsity for Large
Language Models" (DeepSeek, 2026), as in the reference demo (deepseek-ai/Engram
``engram_demo_v1.py``). It is pure numpy and picklable, so it runs in data-loader workers and the
model receives hash ids. ``EngramHashSpec`` is the one definition of the hash.

Legend: B batch, T sequence, N max n-gram order, H heads per order, V raw vocab, C compressed vocab.

Id conventions (documented behaviour):
- raw ids in ``[0, V)`` map through the compressed lookup;
- negative raw ids pass through unchanged, as in the reference (they hash like any other integer);
- raw ids ``>= V`` raise ``ValueError`` naming the id and V;
- left padding (the first n-1 positions of a sequence) uses the *compressed* id of ``pad_id``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np


class Vocabulary(Protocol):
    """What the compressed map reads of a tokenizer (``data.tokenizer.Tokenizer`` has it)."""

    vocab_size: int
    identity: str

    def decode_single(self, token_id: int) -> str: ...

    def token_string(self, token_id: int) -> str: ...


_SENTINEL = "\ue000"
_INT64_MAX = np.iinfo(np.int64).max
_LAYER_SEED_PRIME = 10007


def _reference_normalizer():
    from tokenizers import Regex, normalizers

    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def build_compressed_lookup(tokenizer: Vocabulary) -> np.ndarray:
    """Raw id -> compressed id, keys interned in first-seen order.

    A decoded token containing U+FFFD is keyed by its raw token string; otherwise by its normalized
    text, or the decoded text when normalization leaves nothing.
    """
    normalizer = _reference_normalizer()
    key_to_new: dict[str, int] = {}
    lookup = np.empty(tokenizer.vocab_size, dtype=np.int64)
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.decode_single(token_id)
        if "\ufffd" in text:
            key = tokenizer.token_string(token_id)
        else:
            key = normalizer.normalize_str(text) or text
        lookup[token_id] = key_to_new.setdefault(key, len(key_to_new))
    return lookup


def lookup_checksum(lookup: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lookup, dtype=np.int64).tobytes()).hexdigest()


class CompressedTokenizer:
    """Maps raw token ids to the Engram compressed vocabulary.

    Attributes:
        lookup_table: int64 ``[V]``, raw id -> compressed id.
        num_new_token: C, the compressed vocabulary size (also ``len(self)``).
        identity: the tokenizer's identity string (kind and file sha256), pinned in checkpoints.
    """

    def __init__(self, lookup_table: np.ndarray, identity: str = "unknown"):
        self.lookup_table = np.ascontiguousarray(lookup_table, dtype=np.int64)
        self.num_new_token = int(self.lookup_table.max()) + 1 if self.lookup_table.size else 0
        self.identity = identity

    @classmethod
    def from_tokenizer(cls, tokenizer: Vocabulary) -> CompressedTokenizer:
        """Build from a loaded tokenizer (``data.tokenizer.load_tokenizer(path)``)."""
        return cls(build_compressed_lookup(tokenizer), identity=tokenizer.identity)

    def __len__(self) -> int:
        return self.num_new_token

    @property
    def vocab_size(self) -> int:
        return self.num_new_token

    @property
    def checksum(self) -> str:
        return lookup_checksum(self.lookup_table)

    def __call__(self, input_ids) -> np.ndarray:
        return self.compress(input_ids)

    def compress(self, input_ids) -> np.ndarray:
        """Compress raw ids of any shape; negative ids pass through unchanged."""
        ids = np.asarray(input_ids, dtype=np.int64)
        raw_vocab = self.lookup_table.shape[0]
        if ids.size and ids.max() >= raw_vocab:
            bad = int(ids.max())
            raise ValueError(
                f"token id {bad} is outside the tokenizer (vocab size {raw_vocab}); the data was "
                "tokenized with a different tokenizer than the Engram hasher's"
            )
        if ids.size and ids.min() < 0:
            return np.where(ids >= 0, self.lookup_table[np.maximum(ids, 0)], ids)
        return self.lookup_table[ids]


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for 64-bit integers."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_unseen_prime(start: int, seen: set[int]) -> int:
    candidate = start + 1
    while not is_prime(candidate) or candidate in seen:
        candidate += 1
    return candidate


def engram_head_primes(
    engram_vocab_size: Sequence[int],
    max_ngram_size: int,
    n_head_per_ngram: int,
    layer_ids: Sequence[int],
) -> dict[int, list[list[int]]]:
    """Prime table size of every head: ``{layer: [[prime per head] per order 2..N]}``.

    One seen-set is shared by all layers and walked in layer, order, head order (as the reference
    does), so no two heads anywhere share a modulus.
    """
    seen: set[int] = set()
    primes: dict[int, list[list[int]]] = {}
    for layer_id in layer_ids:
        per_order = []
        for order in range(2, max_ngram_size + 1):
            start = int(engram_vocab_size[order - 2]) - 1
            heads = []
            for _ in range(n_head_per_ngram):
                prime = _next_unseen_prime(start, seen)
                seen.add(prime)
                heads.append(prime)
                start = prime
            per_order.append(heads)
        primes[int(layer_id)] = per_order
    return primes


def head_offsets(table_sizes: Sequence[int]) -> np.ndarray:
    """Offset of every head inside a layer's flat table, ``[K]`` (the one place it is computed)."""
    sizes = np.asarray(table_sizes, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


@dataclass
class EngramHashSpec:
    """Everything that decides an Engram hash id, in the reference ``EngramConfig``'s names.

    The one definition of the hash: ``EngramConfig`` holds it, ``NgramHasher`` takes it, tables
    take their sizes and head offsets from it, and checkpoints pin it (with the compressed map).
    """

    layer_ids: list[int] = field(default_factory=lambda: [1, 15])  # 0-indexed Engram layers
    engram_vocab_size: list[int] = field(
        default_factory=lambda: [129280 * 5, 129280 * 5]
    )  # per n-gram order: where the prime search starts
    max_ngram_size: int = 3  # N: orders 2..N are hashed
    n_head_per_ngram: int = 8  # hash heads (prime-sized tables) per order
    pad_id: int = 2  # raw tokenizer id of the left padding (compressed before use)
    seed: int = 0  # multiplier seed (layer L draws with seed + 10007 * L)
    document_reset: bool = False  # n-grams never reach back across a document start (ours)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix."""
        if self.max_ngram_size < 2:
            raise ValueError(f"engram.hash.max_ngram_size={self.max_ngram_size}: must be >= 2")
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise ValueError(
                f"engram.hash.engram_vocab_size has {len(self.engram_vocab_size)} entries but "
                f"max_ngram_size={self.max_ngram_size} needs one vocab base per n-gram order "
                f"({self.max_ngram_size - 1})"
            )
        if any(int(v) < 2 for v in self.engram_vocab_size):
            raise ValueError(
                f"engram.hash.engram_vocab_size={list(self.engram_vocab_size)}: every base "
                "must be >= 2"
            )
        if self.n_head_per_ngram < 1:
            raise ValueError(f"engram.hash.n_head_per_ngram={self.n_head_per_ngram}: must be >= 1")
        if len(self.layer_ids) == 0 or len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(
                f"engram.hash.layer_ids={list(self.layer_ids)}: must be non-empty, no repeats"
            )

    @property
    def num_heads(self) -> int:
        """K = (N - 1) * H heads per layer."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    def primes(self) -> dict[int, list[list[int]]]:
        """``{layer: [[prime per head] per order]}`` (cached: the search is the slow part)."""
        key = (
            tuple(self.engram_vocab_size),
            self.max_ngram_size,
            self.n_head_per_ngram,
            tuple(self.layer_ids),
        )
        if getattr(self, "_primes_key", None) != key:
            self.validate()
            self._primes = engram_head_primes(*key)
            self._primes_key = key
        return self._primes

    def table_sizes(self, layer_id: int) -> list[int]:
        """Prime size of every head of a layer, order-major: ``[K]``."""
        return [p for order in self.primes()[int(layer_id)] for p in order]

    def head_offsets(self, layer_id: int) -> np.ndarray:
        return head_offsets(self.table_sizes(layer_id))

    def num_rows(self, layer_id: int) -> int:
        return sum(self.table_sizes(layer_id))

    def to_dict(self) -> dict:
        return {
            "layer_ids": [int(i) for i in self.layer_ids],
            "engram_vocab_size": [int(v) for v in self.engram_vocab_size],
            "max_ngram_size": int(self.max_ngram_size),
            "n_head_per_ngram": int(self.n_head_per_ngram),
            "pad_id": int(self.pad_id),
            "seed": int(self.seed),
            "document_reset": bool(self.document_reset),
        }

    @classmethod
    def from_dict(cls, values: dict) -> EngramHashSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def __getstate__(self) -> dict:  # pickle the fields only, not the cache
        return self.to_dict()

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def layer_multipliers(
    seed: int, layer_id: int, max_ngram_size: int, compressed_vocab: int
) -> np.ndarray:
    """Odd int64 multipliers of one layer, drawn exactly as the reference draws them."""
    half_bound = max(1, (_INT64_MAX // int(compressed_vocab)) // 2)
    rng = np.random.default_rng(int(seed + _LAYER_SEED_PRIME * int(layer_id)))
    draws = rng.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64)
    return draws * 2 + 1


class NgramHasher:
    """Hashes the last 2..N tokens at each position into prime-sized tables, per Engram layer.

    Args:
        spec: the hash specification (``engram_vocab_size`` is the per-order prime search base,
            ``pad_id`` a raw tokenizer id, compressed before use).
        compressed_tokenizer: raw id -> compressed id; None only when rebuilt from an exported
            configuration (``from_config_dict``), which can then hash compressed ids only.
    """

    def __init__(
        self,
        spec: EngramHashSpec,
        compressed_tokenizer: CompressedTokenizer | None,
        *,
        _state: dict | None = None,
    ):
        spec.validate()
        self.spec = spec
        self.compressed_tokenizer = compressed_tokenizer
        if _state is not None:  # rebuilt from an exported configuration, maybe without tokenizer
            self.compressed_vocab_size = int(_state["compressed_vocab_size"])
            self.compressed_pad_id = int(_state["compressed_pad_id"])
            self.compressed_map_sha256 = _state["compressed_map_sha256"]
            self.tokenizer_identity = _state["tokenizer_identity"]
        else:
            if compressed_tokenizer is None:
                raise ValueError(
                    "NgramHasher needs a CompressedTokenizer (or use from_config_dict)"
                )
            self.compressed_vocab_size = len(compressed_tokenizer)
            self.compressed_pad_id = int(compressed_tokenizer.compress([spec.pad_id])[0])
            self.compressed_map_sha256 = compressed_tokenizer.checksum
            self.tokenizer_identity = compressed_tokenizer.identity
        self.primes = spec.primes()
        self.multipliers = {
            layer: layer_multipliers(
                spec.seed, layer, spec.max_ngram_size, self.compressed_vocab_size
            )
            for layer in spec.layer_ids
        }
        if _state is not None:
            self._check_exported_state(_state)
        # [(N-1)*H] int64 moduli per layer, order-major (the output's last axis)
        self._moduli = {
            layer: np.array(spec.table_sizes(layer), dtype=np.int64) for layer in spec.layer_ids
        }

    @property
    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.spec.layer_ids]

    @property
    def max_ngram_size(self) -> int:
        return self.spec.max_ngram_size

    @property
    def n_head_per_ngram(self) -> int:
        return self.spec.n_head_per_ngram

    # ----- table layout (from the spec) -----
    def table_sizes(self, layer_id: int) -> list[int]:
        """Prime size of every head of a layer, order-major: ``[(N-1)*H]``."""
        return self.spec.table_sizes(layer_id)

    def head_offsets(self, layer_id: int) -> np.ndarray:
        """Offset of every head inside the layer's flat table: ``[(N-1)*H]``."""
        return self.spec.head_offsets(layer_id)

    def num_rows(self, layer_id: int) -> int:
        return self.spec.num_rows(layer_id)

    # ----- hashing -----
    def hash(self, input_ids, doc_ids=None) -> dict[int, np.ndarray]:
        """Raw ids ``[B, T]`` -> ``{layer_id: int64 [B, T, (N-1)*H]}`` per-head ids (before
        offsets).

        With ``spec.document_reset``, ``doc_ids`` ``[B, T]`` stop the look-back at document starts
        (those slots take the pad id); otherwise they are ignored and the result equals the
        reference.
        """
        if self.compressed_tokenizer is None:
            raise ValueError(
                "this NgramHasher was rebuilt from a configuration without the tokenizer; call "
                "hash_compressed() with compressed ids or attach a CompressedTokenizer"
            )
        return self.hash_compressed(self.compressed_tokenizer.compress(input_ids), doc_ids)

    def hash_compressed(self, compressed_ids, doc_ids=None) -> dict[int, np.ndarray]:
        x = np.asarray(compressed_ids, dtype=np.int64)
        if x.ndim != 2:
            raise ValueError(f"input ids must be [B, T], got shape {x.shape}")
        if not self.spec.document_reset:
            doc_ids = None
        shifts = self._shifted(x, doc_ids)
        return {layer: self._layer_hash(shifts, layer) for layer in self.layer_ids}

    def _shifted(self, x: np.ndarray, doc_ids) -> list[np.ndarray]:
        batch, seq = x.shape
        shifts = [x]
        docs = None if doc_ids is None else np.asarray(doc_ids)
        for k in range(1, self.max_ngram_size):
            shifted = np.full_like(x, self.compressed_pad_id)
            shifted[:, k:] = x[:, : seq - k]
            if docs is not None:
                crosses = np.ones((batch, seq), dtype=bool)
                crosses[:, k:] = docs[:, k:] != docs[:, : seq - k]
                shifted[crosses] = self.compressed_pad_id
            shifts.append(shifted)
        return shifts

    def _layer_hash(self, shifts: list[np.ndarray], layer_id: int) -> np.ndarray:
        batch, seq = shifts[0].shape
        mult = self.multipliers[layer_id]
        heads = self.n_head_per_ngram
        # head-major scratch so every np.remainder writes contiguously; transposed once at the end
        out = np.empty(((self.max_ngram_size - 1) * heads, batch, seq), dtype=np.int64)
        mix = shifts[0] * mult[0]
        term = np.empty_like(mix)
        for order in range(2, self.max_ngram_size + 1):
            np.multiply(shifts[order - 1], mult[order - 1], out=term)
            np.bitwise_xor(mix, term, out=mix)
            base = (order - 2) * heads
            for j, prime in enumerate(self.primes[layer_id][order - 2]):
                np.remainder(mix, prime, out=out[base + j])
        return np.ascontiguousarray(out.transpose(1, 2, 0))  # [(N-1)H, B, T] -> [B, T, (N-1)H]

    # ----- configuration pinning -----
    def to_config_dict(self) -> dict:
        """Plain-dict hash configuration for checkpoints; ``from_config_dict`` rebuilds from it."""
        return {
            **self.spec.to_dict(),
            "compressed_vocab_size": self.compressed_vocab_size,
            "compressed_pad_id": self.compressed_pad_id,
            "compressed_map_sha256": self.compressed_map_sha256,
            "tokenizer_identity": self.tokenizer_identity,
            "multipliers": {str(k): v.tolist() for k, v in self.multipliers.items()},
            "primes": {str(k): v for k, v in self.primes.items()},
        }

    @classmethod
    def from_config_dict(
        cls, config: dict, compressed_tokenizer: CompressedTokenizer | None = None
    ) -> NgramHasher:
        """Rebuild a hasher from ``to_config_dict()`` output, with or without the tokenizer."""
        if (
            compressed_tokenizer is not None
            and compressed_tokenizer.checksum != config["compressed_map_sha256"]
        ):
            raise ValueError(
                "the compressed tokenizer does not match the exported hash configuration "
                "(compressed_map_sha256 differs): use the tokenizer the configuration was made with"
            )
        return cls(EngramHashSpec.from_dict(config), compressed_tokenizer, _state=config)

    def _check_exported_state(self, state: dict) -> None:
        for layer in self.layer_ids:
            if state["multipliers"][str(layer)] != self.multipliers[layer].tolist():
                raise ValueError(
                    f"exported multipliers of layer {layer} do not match the recomputed ones"
                )
            if state["primes"][str(layer)] != self.primes[layer]:
                raise ValueError(
                    f"exported primes of layer {layer} do not match the recomputed ones"
                )


def hash_config_mismatches(saved: dict, current: dict) -> list[str]:
    """Names of the hash-configuration fields that differ between two ``to_config_dict()``
    outputs."""
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k)]
