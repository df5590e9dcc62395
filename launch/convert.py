"""``python -m launch.convert SUBCOMMAND --checkpoint SRC --out DST [options]``

Subcommands (the library functions are in ``pretrain/convert.py``; docs/conversion.md):
- ``dcp-to-hf``: a DCP checkpoint (any layout it was saved at) to a Hugging Face folder:
  sharded safetensors + index, ``config.json`` (with the full Engram hash configuration),
  the tokenizer, and ``modeling_engram.py`` for ``trust_remote_code`` loading.
  ``--layout deepseek_v3`` writes transformers' native DeepseekV3ForCausalLM (flavors without
  Engram or mHC, e.g. ``debug-v3``); ``auto`` (default) picks it when the flavor allows.
- ``hf-to-dcp``: an exported folder back to a one-rank DCP checkpoint (bit-exact); start a job
  from it with ``--checkpoint.initial_load_path=DST``.
- ``reference-to-dcp``: Engram weights under the public reference module's names into a copy of
  ``--base`` (a DCP checkpoint of the model they belong to).
- ``dcp-to-v41`` / ``v41-to-dcp``: Engram layers in DeepSeek-V4.1's layout (``--fp8``: E4M3
  values with E8M0 scales); the import goes into a copy of ``--base``.

Exit status 2 with a one-line reason for bad input (wrong direction, missing or partial files,
unknown or missing tensors, another hash configuration or tokenizer, an unsupported flavor).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from pretrain.conversion import convert

COMMANDS = ("dcp-to-hf", "hf-to-dcp", "reference-to-dcp", "dcp-to-v41", "v41-to-dcp")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--checkpoint", required=True, help="the input folder or file")
    parser.add_argument("--out", required=True, help="the output folder (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--base", help="reference-to-dcp, v41-to-dcp: the DCP checkpoint to fill")
    parser.add_argument("--layout", default="auto", choices=convert.LAYOUTS, help="dcp-to-hf")
    parser.add_argument("--tokenizer", help="the tokenizer file, when not where it was trained")
    parser.add_argument("--config", help="dcp-to-hf of an old checkpoint: the job's config.toml")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--fp8", action="store_true", help="dcp-to-v41: FP8 E4M3 + E8M0 scales")
    parser.add_argument("--max_shard_gib", type=float, default=2.0, help="safetensors file size")
    ns = parser.parse_args(argv)
    if ns.command in ("reference-to-dcp", "v41-to-dcp") and not ns.base:
        parser.error(f"{ns.command} needs --base (a DCP checkpoint of the target model)")
    return ns


def run(ns: argparse.Namespace):
    shard = int(ns.max_shard_gib * 2**30)
    common = dict(overwrite=ns.overwrite)
    if ns.command == "dcp-to-hf":
        return convert.dcp_to_hf(
            ns.checkpoint,
            ns.out,
            layout=ns.layout,
            tokenizer=ns.tokenizer,
            config=ns.config,
            dtype=getattr(torch, ns.dtype),
            max_shard_bytes=shard,
            **common,
        )
    if ns.command == "hf-to-dcp":
        return convert.hf_to_dcp(ns.checkpoint, ns.out, tokenizer=ns.tokenizer, **common)
    if ns.command == "reference-to-dcp":
        return convert.reference_to_dcp(ns.checkpoint, ns.base, ns.out, **common)
    if ns.command == "dcp-to-v41":
        return convert.dcp_to_v41(
            ns.checkpoint,
            ns.out,
            fp8=ns.fp8,
            dtype=getattr(torch, ns.dtype),
            max_shard_bytes=shard,
            **common,
        )
    return convert.v41_to_dcp(ns.checkpoint, ns.base, ns.out, **common)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ns = parse(argv)
    try:
        out = run(ns)
    except (ValueError, FileNotFoundError, KeyError) as err:  # ConversionError, SafetensorsError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
