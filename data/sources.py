"""Document sources for corpus preparation, all offline.

- ``stdlib``: the CPython standard library source of the running interpreter (always available).
- ``pydoc``: Debian ``python3.11-doc`` reST sources, fetched with ``apt-get download`` (no install).
- ``linux-doc``, ``perl-doc``, ``git-doc``, ``fortunes``: more Debian documentation packages.
- user paths: plain-text files, JSONL files (``text`` field), or folders of them.

A document is ``Document(key, text, source)``; ``key`` is stable across machines (a relative path),
so the train/validation split, which hashes it, is stable too.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEBIAN_SOURCES = {
    "pydoc": ("python3.11-doc", "usr/share/doc/python3.11/html/_sources", ("*.rst.txt",)),
    "linux-doc": ("linux-doc-6.1", "usr/share/doc/linux-doc-6.1", ("*.rst.gz", "*.rst")),
    "perl-doc": ("perl-doc", "usr/share/perl", ("*.pod",)),
    "git-doc": ("git-doc", "usr/share/doc/git-doc", ("*.txt", "*.adoc")),
    "fortunes": ("fortunes", "usr/share/games/fortunes", ("*",)),
}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ""}


@dataclass
class Document:
    key: str
    text: str
    source: str


@dataclass
class SourceStats:
    files: int = 0
    bytes: int = 0
    replaced_non_utf8: int = 0
    empty_skipped: int = 0
    file_hashes: dict[str, str] = field(default_factory=dict)


def _read_text(path: Path, stats: SourceStats, key: str) -> str:
    import hashlib

    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    stats.files += 1
    stats.bytes += len(raw)
    stats.file_hashes[key] = hashlib.sha256(raw).hexdigest()[:16]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.replaced_non_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def stdlib_documents(stats: SourceStats) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(
            part.startswith("test") or part in ("site-packages", "dist-packages")
            for part in rel.parts
        ):
            continue
        key = f"stdlib/{rel.as_posix()}"
        yield Document(key, _read_text(path, stats, key), "stdlib")


def fetch_debian_package(package: str, cache: Path, timeout: float = 300) -> Path | None:
    """Download and unpack a Debian package into ``cache``; ``None`` (with a warning) if apt
    can't."""
    target = cache / package
    if (target / ".complete").exists():
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        log.warning("apt-get/dpkg not available: skipping Debian package %s", package)
        return None
    download = cache / f"{package}.download"
    download.mkdir(parents=True, exist_ok=True)
    cmd = ["apt-get", "download", package]
    ok = subprocess.run(cmd, cwd=download, capture_output=True, timeout=timeout).returncode == 0
    if not ok:  # the package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=timeout)
        ok = subprocess.run(cmd, cwd=download, capture_output=True, timeout=timeout).returncode == 0
    debs = sorted(download.glob("*.deb"))
    if not ok or not debs:
        log.warning("could not download Debian package %s: skipping it", package)
        return None
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg", "-x", str(debs[0]), str(target)], check=True, timeout=timeout)
    (target / ".complete").write_text(debs[0].name)
    return target


def debian_documents(name: str, cache: Path, stats: SourceStats) -> Iterator[Document]:
    package, subdir, patterns = DEBIAN_SOURCES[name]
    root = fetch_debian_package(package, cache)
    if root is None or not (root / subdir).is_dir():
        return
    base = root / subdir
    paths = sorted({p for pattern in patterns for p in base.rglob(pattern) if p.is_file()})
    for path in paths:
        key = f"{name}/{path.relative_to(base).as_posix()}"
        text = _read_text(path, stats, key)
        if name == "fortunes":
            if path.suffix or "." in path.name:  # .dat index files and the like
                continue
            for i, entry in enumerate(text.split("\n%\n")):
                yield Document(f"{key}#{i}", entry, name)
        else:
            yield Document(key, text, name)


def user_documents(path: Path, stats: SourceStats) -> Iterator[Document]:
    """Plain-text files (one document each) and JSONL files (one ``text`` per line)."""
    if not path.exists():
        raise FileNotFoundError(
            f"input {path} does not exist; pass existing files or folders to --input"
        )
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        key = f"user/{file.relative_to(path.parent).as_posix()}"
        if file.suffix == ".jsonl":
            for i, line in enumerate(_read_text(file, stats, key).splitlines()):
                if line.strip():
                    record = json.loads(line)
                    yield Document(f"{key}#{i}", str(record.get("text", "")), "user")
        elif file.suffix in TEXT_SUFFIXES or file.suffix == ".gz":
            yield Document(key, _read_text(file, stats, key), "user")
