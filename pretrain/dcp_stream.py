"""Streamed DCP and output folders for conversions: a DCP checkpoint read one tensor or row
block at a time (``DcpCheckpoint``), one written from lazily read sources (``save_dcp``), pieces
of about ``BLOCK_BYTES`` for writers, and outputs built in ``<out>.tmp`` and renamed when complete
(``atomic_folder``). The conversions themselves are ``pretrain/convert.py``.
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
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from tqdm import tqdm

from data.tokenizer import load_tokenizer
from models.args import ModelArgs, model_args_from_dict
from models.hf.layouts import Source
from models.hf.safetensors_io import INDEX, SINGLE, TensorEntry
from parallel.sharding import RowBlocks

BLOCK_BYTES = 64 << 20  # rows moved per read/write: about this many bytes
# single-process DCP is intended here; its "assuming a single process" warning is noise
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)


class ConversionError(ValueError):
    """Bad input to a conversion; the message names the problem and the fix."""


# ----- reading and writing DCP, a block at a time -----------------------------------------------


class DcpCheckpoint:
    """A DCP checkpoint folder (``step-*`` with ``.metadata`` and ``meta.json``), read one tensor
    or row block at a time. A run's checkpoint folder (holding ``step-*``) means its newest
    complete checkpoint."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if (path / INDEX).is_file() or (path / SINGLE).is_file():
            raise ConversionError(
                f"{path} is a Hugging Face safetensors folder, not a DCP checkpoint: use "
                "hf-to-dcp to convert it"
            )
        if not (path / ".metadata").is_file():
            from pretrain.checkpoint import PREFIX, complete_steps

            steps = complete_steps(path) if path.is_dir() else []
            if not steps:
                raise ConversionError(
                    f"{path} is not a DCP checkpoint (no .metadata) and holds no complete "
                    "step-* checkpoint: point --checkpoint at <dump>/checkpoints/step-N"
                )
            path = path / f"{PREFIX}{steps[-1]:08d}"
        if not (path / "meta.json").is_file():
            raise ConversionError(
                f"{path} has no meta.json: the checkpoint is incomplete (an interrupted save)"
            )
        self.path = path
        self.meta = json.loads((path / "meta.json").read_text())
        self._reader = dcp.FileSystemReader(str(path))
        self.metadata = self._reader.read_metadata()

    def entries(self, prefix: str = "model.") -> dict[str, TensorEntry]:
        """Tensors under ``prefix`` (the model's weights), without the prefix."""
        out = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if key.startswith(prefix) and isinstance(md, TensorStorageMetadata):
                name = key[len(prefix) :]
                out[name] = TensorEntry(name, tuple(md.size), md.properties.dtype)
        return out

    def _job_config(self, config: str | None):
        """The job's config: ``config``, or the run folder's ``config.toml`` (older checkpoints
        record no model_args; the trainer writes its config beside its checkpoints)."""
        from pretrain.config import load_config

        path = Path(config) if config else self.path.parent.parent / "config.toml"
        if not path.is_file():
            raise ConversionError(
                f"{self.path}/meta.json has no model_args (a checkpoint from before conversion "
                "support) and no config.toml is beside the run: pass --config <its config.toml>"
            )
        return load_config(str(path))

    def model_args(self, config: str | None = None) -> ModelArgs:
        if "model_args" in self.meta:
            return model_args_from_dict(self.meta["model_args"])
        from pretrain.builders import build_model_args

        cfg = self._job_config(config)
        return build_model_args(cfg.model, load_tokenizer(self.tokenizer_path()), cfg.data.seq_len)

    def tokenizer_path(self, override: str | None = None) -> Path:
        path = override or self.meta.get("tokenizer_path")
        if not path and "model_args" not in self.meta:  # an older checkpoint: the job's config
            data = self._job_config(None).data
            path = data.tokenizer or str(Path(data.dataset_path) / "tokenizer.model")
        if not path or not Path(path).is_file():
            raise ConversionError(
                f"the tokenizer of {self.path} ({path or 'not recorded'}) is not on this machine: "
                "pass --tokenizer <its tokenizer.model or tokenizer.json>"
            )
        return Path(path)

    def read_rows(self, name: str, start: int, stop: int, entry: TensorEntry) -> torch.Tensor:
        buffer = torch.empty(stop - start, *entry.shape[1:], dtype=entry.dtype)
        blocks = RowBlocks(buffer, start, entry.shape[0], block_rows=max(1, stop - start))
        dcp.load({"model": {name: blocks}}, storage_reader=self._reader, no_dist=True)
        return buffer

    def read(self, name: str, entry: TensorEntry) -> torch.Tensor:
        if len(entry.shape) >= 1 and entry.shape[0] > 0:
            return self.read_rows(name, 0, entry.shape[0], entry)
        value = torch.empty(entry.shape, dtype=entry.dtype)
        dcp.load({"model": {name: value}}, storage_reader=self._reader, no_dist=True)
        return value


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
