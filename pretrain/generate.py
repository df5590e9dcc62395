"""``python -m pretrain.generate --checkpoint DIR --prompt TEXT [--max_new_tokens 64]
[--temperature 0 | --temperature 0.8 --top_p 0.9 --seed 0]``

Text generation from a DCP checkpoint. The checkpoint's weights go into the inference model that
exports use (``models/hf/modeling_engram.py``, equal to our model to float32 rounding, tested):
a KV cache (GQA's keys and values, or MLA's compressed latent and shared rope key), and
incremental Engram hashing and convolution from the last N-1 compressed ids and the conv history
per sequence. Greedy by default (``--temperature 0``); top-p sampling otherwise. Needs the
``[hf]`` extra (transformers).
"""

from __future__ import annotations

import argparse
import sys

import torch

from data.tokenizer import load_tokenizer
from pretrain.convert import ConversionError, hasher_for, load_model


def inference_model(
    checkpoint, tokenizer: str | None = None, config: str | None = None, max_seq_len: int = 0
):
    """``(model, tokenizer)``: the checkpoint's weights in the cached inference model
    (``max_seq_len``: see ``pretrain.convert.load_model``)."""
    try:
        from models.hf.modeling_engram import EngramDeepseekConfig, EngramDeepseekForCausalLM
    except ImportError as err:
        raise ImportError("generation needs transformers: pip install -e '.[hf]'") from err
    from models.hf.layouts import COMPRESSED_MAP, engram_hf_config

    ours, args, tok_path = load_model(checkpoint, config, tokenizer, max_seq_len or None)
    tok = load_tokenizer(tok_path)
    hasher = hasher_for(args, tok_path)
    values = engram_hf_config(args, hasher.to_config_dict() if hasher else None, tok)
    for key in ("architectures", "auto_map", "model_type"):
        values.pop(key)
    model = EngramDeepseekForCausalLM(EngramDeepseekConfig(**values))
    state = {
        "lm_head.weight" if name == "output.weight" else f"model.{name}": value
        for name, value in ours.state_dict().items()
    }
    if hasher is not None:
        state[COMPRESSED_MAP] = torch.from_numpy(hasher.compressed_tokenizer.lookup_table)
    model.load_state_dict(state, strict=True)
    return model.eval(), tok


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """``prompt [B, T]`` -> ``[B, T + new]`` (stops early when every row has hit ``eos_id``)."""
    limit = model.config.max_position_embeddings - prompt.shape[1]
    if limit <= 0:
        raise ValueError(
            f"the prompt has {prompt.shape[1]} tokens; the model's max_seq_len is "
            f"{model.config.max_position_embeddings}"
        )
    torch.manual_seed(seed)
    sample = temperature > 0
    return model.generate(
        prompt,
        max_new_tokens=min(max_new_tokens, limit),
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id if eos_id is not None else 0,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a DCP step folder or a run's checkpoints")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="the tokenizer file, when not where it was trained")
    ns = p.parse_args(argv)
    try:
        model, tok = inference_model(ns.checkpoint, ns.tokenizer)
        prompt = torch.tensor([tok.encode(ns.prompt)])
        if prompt.numel() == 0:
            raise ValueError("the prompt is empty after tokenisation")
        out = generate(
            model,
            prompt,
            ns.max_new_tokens,
            temperature=ns.temperature,
            top_p=ns.top_p,
            eos_id=tok.eos_id,
            seed=ns.seed,
        )
    except (ConversionError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(ns.prompt + tok.decode(out[0, prompt.shape[1] :].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
