"""``python -m models.summary FLAVOR [--json] [--seq_len N]``: parameters and FLOPs of a flavor.

The numbers come from ``models.accounting.account`` and are cross-checked against a meta-device
build.
"""

from __future__ import annotations

import argparse
import json

import torch

from models.accounting import account, count_meta_params
from models.flavors import FLAVORS, resolve_model_args
from models.transformer import Transformer


def summarize(flavor: str, seq_len: int | None = None) -> dict:
    args = resolve_model_args(flavor)
    result = account(args, seq_len).as_dict()
    with torch.device("meta"):
        meta = count_meta_params(Transformer(args))
    for key, value in meta.items():
        if value != result[key]:
            raise AssertionError(
                f"{flavor}: accounting {key}={result[key]} but meta model has {value}"
            )
    result["flavor"] = flavor
    result["meta_checked"] = True
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("flavor", choices=sorted(FLAVORS))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--seq_len", type=int, default=None, help="for attention FLOPs (default max)"
    )
    ns = parser.parse_args(argv)
    result = summarize(ns.flavor, ns.seq_len)
    if ns.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        shown = f"{value / 1e9:.3f} B" if isinstance(value, int) and value > 10**6 else value
        print(f"{key:>22}: {shown}")


if __name__ == "__main__":
    main()
