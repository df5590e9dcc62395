"""Shared test fixtures: reference parity cases, the DeepSeek-V3 tokenizer, tiny corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def parity_dir() -> Path:
    return Path(os.environ.get("ENGRAM_PARITY_DIR", REPO.parent / "shared" / "engram_reference"))


def parity_cases() -> list[Path]:
    root = parity_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "config.json").is_file())


@pytest.fixture(scope="session")
def deepseek_compressed():
    from data.ngram_hash import CompressedTokenizer
    from data.tokenizer import deepseek_v3_tokenizer_path

    return CompressedTokenizer.from_file(deepseek_v3_tokenizer_path())
