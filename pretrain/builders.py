"""Builds the job's components from their own config sections: data, tokenizer, hasher, model
args."""

from __future__ import annotations

import logging
from pathlib import Path

from data.ngram_hash import CompressedTokenizer, NgramHasher
from data.tokenizer import Tokenizer, load_tokenizer
from models.args import ModelArgs
from models.flavors import apply_overrides, get_flavor
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
    args = apply_overrides(get_flavor(cfg.flavor), cfg.overrides)
    args.vocab_size = cfg.vocab_size or tokenizer.vocab_size
    if args.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={args.vocab_size} is below the tokenizer's "
            f"{tokenizer.vocab_size}; raise it or set 0 (use the tokenizer's)"
        )
    if args.engram is not None and "engram.pad_id" not in cfg.overrides:
        args.engram.pad_id = tokenizer.pad_id
    if seq_len > args.max_seq_len:
        raise ValueError(
            f"data.seq_len={seq_len} exceeds the flavor's max_seq_len={args.max_seq_len}; "
            f"lower data.seq_len or set --model.overrides.max_seq_len={seq_len}"
        )
    args.validate()
    return args


def build_hasher(args: ModelArgs, tokenizer: Tokenizer) -> NgramHasher | None:
    if args.engram is None:
        return None
    e = args.engram
    return NgramHasher(
        CompressedTokenizer.from_tokenizer(tokenizer),
        engram_vocab_size=e.engram_vocab_size,
        max_ngram_size=e.max_ngram_size,
        n_head_per_ngram=e.n_head_per_ngram,
        layer_ids=e.layer_ids,
        pad_id=e.pad_id,
        seed=e.seed,
    )
