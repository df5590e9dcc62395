"""Builds the job's components from their own config sections: data, tokenizer, hasher, model
args, loader."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from data.ngram_hash import CompressedTokenizer, NgramHasher
from data.tokenizer import Tokenizer, load_tokenizer
from models.args import ModelArgs
from models.spec import get_model_spec
from parallel.distributed import barrier
from pretrain.config import DataConfig, ModelConfig

log = logging.getLogger(__name__)


def ensure_dataset(cfg: DataConfig, rank: int) -> Path:
    """Prepare the corpus on rank 0 when it is missing (and allowed); every rank then checks it."""
    folder = Path(cfg.dataset_path)
    manifest = folder / "manifest.json"
    # a mixture that blends this corpus's own sources reads them from its per-source folders (a
    # corpus prepared without them is prepared again)
    inside = [
        m for m in cfg.mixture if m.get("format") == "shards" and Path(m["path"]).parent == folder
    ]
    by_source = bool(inside)
    stale = (
        by_source and manifest.is_file() and not json.loads(manifest.read_text()).get("by_source")
    )
    if (not manifest.is_file() or stale) and not cfg.url_prefix:
        if not cfg.prepare_if_missing:
            what = " with one folder per source (data.mixture)" if stale else ""
            flag = " --by_source" if by_source else ""
            raise FileNotFoundError(
                f"no prepared data{what} in {folder}; run `python -m data.prepare --out "
                f"{folder}{flag}` or set data.prepare_if_missing=true"
            )
        if rank == 0:
            from data.prepare import prepare

            log.info(
                "preparing the corpus in %s (sources: %s; inputs: %s)",
                folder,
                cfg.sources,
                cfg.inputs,
            )
            done = prepare(
                folder,
                cfg.sources,
                cfg.inputs,
                cfg.tokenizer_vocab_size,
                cfg.tokenizer or None,
                by_source=by_source,
            )
            log.info("corpus ready: %s", done["splits"])
        barrier()
    return folder


def mixture_and_folder(cfg: DataConfig, rank: int) -> tuple[Path, list | None]:
    """The prepared folder (prepared first where needed; a mixture with its own tokenizer needs
    none) and the mixture's sources to read (None: the folder alone)."""
    from data.mixture import parse_mixture, present, with_default_val

    specs = parse_mixture(cfg.mixture) if cfg.mixture else None
    folder = Path(cfg.dataset_path) if specs and cfg.tokenizer else ensure_dataset(cfg, rank)
    return folder, with_default_val(present(specs)) if specs else None


def build_tokenizer(cfg: DataConfig, folder: Path) -> Tokenizer:
    return load_tokenizer(cfg.tokenizer or folder / "tokenizer.model")


def build_model_args(cfg: ModelConfig, tokenizer: Tokenizer, seq_len: int) -> ModelArgs:
    return get_model_spec(cfg.family).resolve_args(
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
