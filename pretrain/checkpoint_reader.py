"""Reading a saved DCP checkpoint outside training: its meta, model settings and tokenizer, its
tensors one at a time or a row block at a time (``DcpCheckpoint``, what conversions stream from),
and its weights in our model for evaluation, generation and analysis (``load_model``,
``hasher_for``). Training's own save and resume is ``pretrain.checkpoint``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from data.ngram_hash import CompressedTokenizer, NgramHasher
from data.tokenizer import load_tokenizer
from models.args import ModelArgs, model_args_from_dict
from models.hf.safetensors_io import INDEX, SINGLE, TensorEntry
from parallel.sharding import RowBlocks

# single-process DCP is intended here; its "assuming a single process" warning is noise
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the problem and the fix."""


class DcpCheckpoint:
    """A DCP checkpoint folder (``step-*`` with ``.metadata`` and ``meta.json``), read one tensor
    or row block at a time. A run's checkpoint folder (holding ``step-*``) means its newest
    complete checkpoint."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if (path / INDEX).is_file() or (path / SINGLE).is_file():
            raise CheckpointError(
                f"{path} is a Hugging Face safetensors folder, not a DCP checkpoint: use "
                "hf-to-dcp to convert it"
            )
        if not (path / ".metadata").is_file():
            from pretrain.checkpoint import PREFIX, complete_steps

            steps = complete_steps(path) if path.is_dir() else []
            if not steps:
                raise CheckpointError(
                    f"{path} is not a DCP checkpoint (no .metadata) and holds no complete "
                    "step-* checkpoint: point --checkpoint at <dump>/checkpoints/step-N"
                )
            path = path / f"{PREFIX}{steps[-1]:08d}"
        if not (path / "meta.json").is_file():
            raise CheckpointError(
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
            raise CheckpointError(
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
            raise CheckpointError(
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


def hasher_for(args: ModelArgs, tokenizer_path: Path) -> NgramHasher | None:
    """The Engram hasher of a model with ``args`` and its tokenizer (None: no Engram layers)."""
    if args.engram is None:
        return None
    compressed = CompressedTokenizer.from_tokenizer(load_tokenizer(tokenizer_path))
    return NgramHasher(args.engram.hash, compressed)


def load_model(
    checkpoint: str | Path,
    config: str | None = None,
    tokenizer: str | None = None,
    max_seq_len: int | None = None,
):
    """Our model (one process, CPU, float32) with a DCP checkpoint's weights, plus its args and
    tokenizer path: what evaluation, generation and conversion checks run. ``max_seq_len`` runs
    the model at more positions than it was trained for (RoPE as it is: no YaRN), to measure a
    model before a long-context extension."""
    from models.transformer import build_model

    ckpt = DcpCheckpoint(checkpoint)
    args = ckpt.model_args(config)
    if max_seq_len:
        args.max_seq_len = max_seq_len
    model = build_model(args)  # non-persistent buffers (RoPE, offsets) initialised here
    state = model.state_dict()
    dcp.load({"model": state}, storage_reader=ckpt._reader, no_dist=True)
    model.load_state_dict(state)
    return model.eval(), args, ckpt.tokenizer_path(tokenizer)
