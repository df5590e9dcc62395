"""Builds the job's components from their own config sections: data, tokenizer, hasher, model
args, loader."""

from __future__ import annotations

import logging
from pathlib import Path

from data.ngram_hash import CompressedTokenizer, NgramHasher
from data.tokenizer import Tokenizer, load_tokenizer
from models.args import ModelArgs
from models.flavors import resolve_model_args
from parallel.distributed import barrier
from pretrain.config import DataConfig, ModelConfig

log = logging.getLogger(__name__)


def ensure_dataset(cfg: DataConfig, rank: int) -> Path:
    """Prepare the corpus on rank 0 when it is missing (and allowed); every rank then checks it."""
    folder = Path(cfg.dataset_path)
    if not (folder / "manifest.json").is_file() and not cfg.url_prefix:
        if not cfg.prepare_if_missing:
            raise FileNotFoundError(
                f"no prepared data in {folder}; run `python -m data.prepare --out {folder}` or set "
                "data.prepare_if_missing=true"
            )
        if rank == 0:
            from data.prepare import prepare

            log.info(
                "preparing the corpus in %s (sources: %s; inputs: %s)",
                folder,
                cfg.sources,
                cfg.inputs,
            )
            manifest = prepare(
                folder, cfg.sources, cfg.inputs, cfg.tokenizer_vocab_size, cfg.tokenizer or None
            )
            log.info("corpus ready: %s", manifest["splits"])
        barrier()
    return folder


def build_tokenizer(cfg: DataConfig, folder: Path) -> Tokenizer:
    return load_tokenizer(cfg.tokenizer or folder / "tokenizer.model")


def build_model_args(cfg: ModelConfig, tokenizer: Tokenizer, seq_len: int) -> ModelArgs:
    return resolve_model_args(
        cfg.flavor,
        cfg.overrides,
        vocab_size=cfg.vocab_size,
        tokenizer_vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        seq_len=seq_len,
    )


def build_hasher(args: ModelArgs, tokenizer: Tokenizer) -> NgramHasher | None:
    if args.engram is None:
        return None
    return NgramHasher(args.engram.hash, CompressedTokenizer.from_tokenizer(tokenizer))
