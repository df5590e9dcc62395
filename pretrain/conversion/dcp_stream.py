"""Streamed DCP and output folders for conversions: a DCP checkpoint written from lazily read
sources (``save_dcp``), pieces of about ``BLOCK_BYTES`` for writers, and outputs built in
``<out>.tmp`` and renamed when complete (``atomic_folder``). Reading a checkpoint a block at a
time is ``pretrain.checkpoint_reader.DcpCheckpoint``; the conversions are
``pretrain/conversion/convert.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from tqdm import tqdm

from models.hf.layouts import Source
from models.hf.safetensors_io import TensorEntry
from parallel.sharding import RowBlocks
from pretrain.checkpoint_reader import CheckpointError

# bad input to a conversion (the message names the problem and the fix); a checkpoint that cannot
# be read raises the same error
ConversionError = CheckpointError

BLOCK_BYTES = 64 << 20  # rows moved per read/write: about this many bytes
# single-process DCP is intended here; its "assuming a single process" warning is noise
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)


class LazyRows:
    """Rows of a tensor produced on demand by ``read_rows(start, stop)``: the source of a
    ``RowBlocks`` that DCP saves block by block."""

    def __init__(self, entry: TensorEntry, read_rows: Callable[[int, int], torch.Tensor]):
        self.entry, self._read = entry, read_rows
        self.shape, self.dtype = torch.Size(entry.shape), entry.dtype

    def __getitem__(self, index: slice) -> torch.Tensor:
        start, stop, _ = index.indices(self.shape[0])
        if stop <= start:
            return torch.empty(0, *self.shape[1:], dtype=self.dtype)
        return self._read(start, stop)


def block_rows(entry: TensorEntry) -> int:
    """Rows per streamed block: about ``BLOCK_BYTES``."""
    row = TensorEntry("", entry.shape[1:], entry.dtype).nbytes or 1
    return max(1, BLOCK_BYTES // row)


def save_dcp(folder: Path, sources: dict[str, Source], meta: dict, progress: tqdm) -> None:
    """A DCP checkpoint of ``sources`` (model weights only) plus ``meta.json``; every tensor of
    two or more dimensions is written in row blocks read lazily."""
    state = {}
    for name, src in sources.items():
        entry = src.entry
        if len(entry.shape) >= 2 and entry.shape[0] > 0:
            state[name] = RowBlocks(
                LazyRows(entry, _counted(src.read_rows, progress)),
                0,
                entry.shape[0],
                block_rows=block_rows(entry),
            )
        else:
            state[name] = src.read()
            progress.update(entry.nbytes)
    dcp.save({"model": state}, checkpoint_id=str(folder), no_dist=True)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _counted(read_rows, progress: tqdm):
    def read(start: int, stop: int) -> torch.Tensor:
        rows = read_rows(start, stop)
        progress.update(rows.numel() * rows.element_size())
        return rows

    return read


def pieces_of(src: Source) -> Iterator[torch.Tensor]:
    entry = src.entry
    if len(entry.shape) < 1 or entry.shape[0] == 0:
        yield src.read()
        return
    step = block_rows(entry)
    for start in range(0, entry.shape[0], step):
        yield src.read_rows(start, min(entry.shape[0], start + step))


# ----- outputs ----------------------------------------------------------------------------------


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False):
    """Yield ``<out>.tmp`` to fill; rename it to ``out`` when the block finishes. A failure
    removes the temporary folder, so nothing under ``out`` ever looks complete but is not."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConversionError(f"{out} exists and is not empty: remove it or pick another --out")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def progress_bar(total_bytes: int, what: str) -> tqdm:
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=what)
