"""``python -m launch.generate --checkpoint DIR --prompt TEXT [--max_new_tokens 64]
[--temperature 0 | --temperature 0.8 --top_p 0.9 --seed 0]``

Text from a DCP checkpoint with the model that trained it and its decoding cache
(``pretrain.inference.generate``). Greedy by default (``--temperature 0``); top-p sampling
otherwise. Needs nothing beyond the core install.
"""

from __future__ import annotations

import argparse
import sys

import torch

from data.tokenizer import load_tokenizer
from pretrain.checkpoint_reader import CheckpointError, hasher_for, load_model
from pretrain.inference.generate import generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a DCP step folder or a run's checkpoints")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="the tokenizer file, when not where it was trained")
    ns = p.parse_args(argv)
    try:
        model, args, tok_path = load_model(ns.checkpoint, tokenizer=ns.tokenizer)
        tok = load_tokenizer(tok_path)
        prompt = torch.tensor([tok.encode(ns.prompt)])
        if prompt.numel() == 0:
            raise ValueError("the prompt is empty after tokenisation")
        out = generate(
            model,
            hasher_for(args, tok_path),
            prompt,
            ns.max_new_tokens,
            temperature=ns.temperature,
            top_p=ns.top_p,
            eos_id=tok.eos_id,
            seed=ns.seed,
        )
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(ns.prompt + tok.decode(out[0, prompt.shape[1] :].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
