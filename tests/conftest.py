"""Shared test fixtures: reference parity cases, the DeepSeek-V3 tokenizer, tiny corpora.

Test processes run torch at one thread, and so do the ranks they spawn (they inherit the
environment): on 2 cores, several processes at torch's default oversubscribe badly (a 256 x 256
``trunc_normal_`` took 150 ms instead of 1.7 ms). A test that wants more threads sets them itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, for spawned ranks too
if "ENGRAM_CACHE" not in os.environ:  # the document index of test corpora: not the user's cache
    import atexit
    import tempfile

    os.environ["ENGRAM_CACHE"] = tempfile.mkdtemp(prefix="engram-test-cache-")
    atexit.register(__import__("shutil").rmtree, os.environ["ENGRAM_CACHE"], True)

import shutil  # noqa: E402
import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]


def parity_dir() -> Path:
    """The reference parity cases: ``tests/engram_reference`` (in the repository), or
    ``$ENGRAM_PARITY_DIR``."""
    return Path(os.environ.get("ENGRAM_PARITY_DIR", REPO / "tests" / "engram_reference"))


def parity_cases() -> list[Path]:
    root = parity_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "config.json").is_file())


@pytest.fixture(scope="session")
def deepseek_compressed():
    from data.ngram_hash import CompressedTokenizer
    from data.tokenizer import deepseek_v3_tokenizer_path, load_tokenizer

    return CompressedTokenizer.from_tokenizer(load_tokenizer(deepseek_v3_tokenizer_path()))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small real corpus: 150 stdlib modules as user input, a 1k BPE, small shards."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:150]
    for path in stdlib:
        shutil.copy(path, src / path.name)
    shutil.copy(stdlib[0], src / "duplicate.py")
    (src / "empty.txt").write_text("   \n")
    (src / "latin1.txt").write_bytes("caf\xe9 au lait, bien s\xfbr\n".encode("latin-1") * 20)
    from data.prepare import prepare

    prepare(
        root / "data",
        sources=(),
        inputs=[str(src)],
        vocab_size=1000,
        shard_bytes=64 << 10,
        val_per_mille=100,
    )
    return root / "data"
