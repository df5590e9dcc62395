"""``python -m models.summary FLAVOR [--json] [--seq_len N] [--float8 [--engram_fp8]]``:
parameters and FLOPs of a flavor, and with ``--float8`` which GEMMs ``[quantize]`` runs in FP8.

The numbers come from ``models.accounting.account`` and are cross-checked against a meta-device
build.
"""

from __future__ import annotations

import argparse
import json

import torch

from models.accounting import account, count_meta_params
from models.flavors import FLAVORS, resolve_model_args
from models.quantize import float8_plan
from models.transformer import Transformer


def summarize(
    flavor: str, seq_len: int | None = None, float8: bool = False, engram_fp8: bool = False
) -> dict:
    args = resolve_model_args(flavor)
    result = account(args, seq_len).as_dict()
    with torch.device("meta"):
        model = Transformer(args)
    meta = count_meta_params(model)
    for key, value in meta.items():
        if value != result[key]:
            raise AssertionError(
                f"{flavor}: accounting {key}={result[key]} but meta model has {value}"
            )
    result["flavor"] = flavor
    result["meta_checked"] = True
    if float8:
        plan = float8_plan(model, engram=engram_fp8)
        result["fp8_linears"] = len(plan.linears)
        result["fp8_engram_gemms"] = len(plan.engram)
        result["fp8_gemm_params"] = plan.fp8_params
        result["fp8_skipped"] = sorted(plan.skipped)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("flavor", choices=sorted(FLAVORS))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--seq_len", type=int, default=None, help="for attention FLOPs (default max)"
    )
    parser.add_argument(
        "--float8", action="store_true", help="list the GEMMs quantize.linear.float8 converts"
    )
    parser.add_argument(
        "--engram_fp8", action="store_true", help="with --float8: quantize.engram=true"
    )
    ns = parser.parse_args(argv)
    result = summarize(ns.flavor, ns.seq_len, ns.float8, ns.engram_fp8)
    if ns.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        shown = f"{value / 1e9:.3f} B" if isinstance(value, int) and value > 10**6 else value
        print(f"{key:>22}: {shown}")


if __name__ == "__main__":
    main()
