"""Sharded safetensors folders, written and read a piece at a time.

The ``safetensors`` package writes a file from whole tensors held in memory and reads through a
memory map (whose touched pages count in the process's RSS). Conversions of tables larger than
RAM need neither: ``write_folder`` writes each file's header from the planned shapes and then
streams every tensor's bytes piece by piece, and ``SafetensorsFolder`` reads row ranges with
``pread``. The files are ordinary safetensors (the format: an 8-byte little-endian header length,
a JSON header of dtype, shape and byte range per tensor, then the bytes), so ``safetensors`` and
``transformers`` read them as usual.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e8m0fnu: "F8_E8M0",
}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A folder or file that is not a complete safetensors export (the message says which)."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive entries grouped into files of at most ``max_shard_bytes`` (a larger tensor
    gets a file of its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return [s for s in shards if s]


def _header(entries: list[TensorEntry], metadata: dict[str, str] | None) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": _DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _bytes_of(piece: torch.Tensor) -> memoryview:
    flat = piece.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_folder(
    folder: Path,
    entries: list[TensorEntry],
    pieces: Callable[[TensorEntry], Iterable[torch.Tensor]],
    *,
    max_shard_bytes: int = 2 << 30,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Write ``entries`` into ``model-0000i-of-0000n.safetensors`` files plus
    ``model.safetensors.index.json``; returns the weight map.

    ``pieces(entry)`` yields the entry's values in row-major order, in any number of pieces
    (for a table: blocks of rows), so at most one piece is in memory at a time.
    ``progress(bytes)`` is called after every piece.
    """
    shards = plan_shards(entries, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(folder / name, "wb") as handle:
            handle.write(_header(shard, metadata))
            for entry in shard:
                written = 0
                for piece in pieces(entry):
                    if piece.dtype != entry.dtype:
                        raise SafetensorsError(
                            f"{entry.name}: a piece of dtype {piece.dtype}, planned {entry.dtype}"
                        )
                    data = _bytes_of(piece)
                    handle.write(data)
                    written += len(data)
                    if progress is not None:
                        progress(len(data))
                if written != entry.nbytes:
                    raise SafetensorsError(
                        f"{entry.name}: wrote {written} bytes, its shape {entry.shape} needs "
                        f"{entry.nbytes}"
                    )
                weight_map[entry.name] = name
            handle.flush()
            os.fsync(handle.fileno())
    total = sum(e.nbytes for e in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return weight_map


@dataclass(frozen=True)
class _Stored:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int  # absolute byte offset of the tensor in the file


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path} is empty or truncated (no header)")
            (length,) = struct.unpack("<Q", head)
            if length > 100 << 20:
                raise SafetensorsError(
                    f"{path}: a header of {length} bytes; not a safetensors file"
                )
            header = json.loads(handle.read(length))
    except FileNotFoundError as err:
        raise SafetensorsError(f"{path} is missing (listed in {INDEX})") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"{path}: the header is not valid JSON ({err})") from err
    return header, 8 + length


class SafetensorsFolder:
    """Read-only view of an exported folder (``model.safetensors.index.json`` and its files, or
    one ``model.safetensors``): names, shapes and dtypes from the headers, values by ``pread``.

    Raises ``SafetensorsError`` for a missing file, a tensor the index lists but no file holds,
    or a file shorter than its header says (an interrupted copy).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if self.folder.is_file():  # one file
            weight_map, files = None, [self.folder.name]
            self.folder = self.folder.parent
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise SafetensorsError(
                f"{self.folder} holds neither {INDEX} nor {SINGLE}: not a safetensors export"
            )
        self.tensors: dict[str, _Stored] = {}
        self.metadata: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            header, data_start = _read_header(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            end = data_start
            for key, info in header.items():
                if info["dtype"] not in _BY_NAME:
                    raise SafetensorsError(f"{path}: {key} has unsupported dtype {info['dtype']}")
                begin, stop = info["data_offsets"]
                self.tensors[key] = _Stored(
                    path, tuple(info["shape"]), _BY_NAME[info["dtype"]], data_start + begin
                )
                end = max(end, data_start + stop)
            if path.stat().st_size < end:
                raise SafetensorsError(
                    f"{path} is {path.stat().st_size} bytes but its header describes {end}: the "
                    "file is truncated (an interrupted copy or download)"
                )
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise SafetensorsError(
                    f"{INDEX} lists {len(missing)} tensors that no file holds: {missing[:5]}"
                )

    def names(self) -> list[str]:
        return list(self.tensors)

    def entry(self, name: str) -> TensorEntry:
        stored = self._stored(name)
        return TensorEntry(name, stored.shape, stored.dtype)

    def _stored(self, name: str) -> _Stored:
        if name not in self.tensors:
            raise KeyError(f"{self.folder}: no tensor named {name!r}")
        return self.tensors[name]

    def read(self, name: str) -> torch.Tensor:
        stored = self._stored(name)
        rows = stored.shape[0] if stored.shape else 1
        out = self.read_rows(name, 0, rows)
        return out.reshape(stored.shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the first axis."""
        stored = self._stored(name)
        inner = stored.shape[1:]
        row_bytes = TensorEntry(name, inner, stored.dtype).nbytes
        count = stop - start
        buffer = bytearray(count * row_bytes)
        with open(stored.file, "rb") as handle:
            view, offset, got = memoryview(buffer), stored.start + start * row_bytes, 0
            while got < len(buffer):
                n = os.preadv(handle.fileno(), [view[got:]], offset + got)
                if n == 0:
                    raise SafetensorsError(f"{stored.file}: unexpected end of file in {name}")
                got += n
        if not buffer:
            return torch.empty(count, *inner, dtype=stored.dtype)
        return torch.frombuffer(buffer, dtype=stored.dtype).reshape(count, *inner)
