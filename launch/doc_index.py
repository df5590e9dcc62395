"""``python -m launch.doc_index --config CFG [--workers N] [--num_shards K --shard_index I]
[--section.key=value ...]``

Count the documents of a job's ``text`` and ``shards`` sources ahead of training, into the cache
that ``data.doc_index`` keeps in ``data.index_dir`` (a slurm array splits the files with
``--num_shards K --shard_index I``). Ends with one JSON line: files, counted, missing, dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from data.doc_index import build, default_dir, mixture_entries
from pretrain.builders import build_tokenizer, mixture_and_folder
from pretrain.config import load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m launch.doc_index",
        description="Count the documents of a config's text and shards sources ahead of training.",
    )
    parser.add_argument("--config", required=True, help="the training config (TOML)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--num_shards", type=int, default=1, help="split the files into K tasks")
    parser.add_argument("--shard_index", type=int, default=0, help="this task, 0..K-1")
    args, overrides = parser.parse_known_args(argv)  # and --section.key=value overrides
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard_index must be in 0..{args.num_shards - 1}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, overrides)
    folder, specs = mixture_and_folder(cfg.data, 0)
    if not specs:
        parser.error(f"{args.config} has no [[data.mixture]] tables: nothing to index")
    tokenizer = build_tokenizer(cfg.data, folder)
    directory = default_dir(cfg.data.index_dir)
    entries = mixture_entries(specs, tokenizer.identity)
    counted = build(
        entries,
        directory,
        tokenizer.path,
        strict=cfg.data.strict,
        workers=args.workers,
        share=(args.shard_index, args.num_shards),
    )
    missing = sum(not e.path(directory).is_file() for e in entries)
    print(
        json.dumps(
            {"files": len(entries), "counted": counted, "missing": missing, "dir": str(directory)}
        )
    )


if __name__ == "__main__":
    main()
