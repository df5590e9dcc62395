"""Text generation (``python -m launch.generate``) with the model that trained
(``models.Transformer``) and its decoding cache (``models.kv_cache.KVCache``): GQA's keys and
values or MLA's compressed latent and shared rope key, and incremental Engram hashing and
convolution from the last N-1 ids and the convolution context of each sequence. Greedy at
temperature 0; top-p sampling otherwise.

Legend: B batch, T prompt length, V vocab.
"""

from __future__ import annotations

import torch

from models.kv_cache import KVCache


def next_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator):
    """``logits [B, V]`` -> ``[B]``: the argmax at temperature 0, else a draw from the smallest
    set of tokens whose probability reaches ``top_p``."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ahead of each
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first always stays
    choice = torch.multinomial(sorted_probs, 1, generator=gen)  # renormalised by multinomial
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    hasher,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int = 0,
    logits_out: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``prompt [B, T]`` -> ``[B, T + new]`` (stops early when every row has hit ``eos_id``;
    rows that have are continued with it). ``logits_out`` collects each step's ``[B, V]``."""
    limit = model.args.max_seq_len - prompt.shape[1]
    if limit <= 0:
        raise ValueError(
            f"the prompt has {prompt.shape[1]} tokens; the model's max_seq_len is "
            f"{model.args.max_seq_len}"
        )
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    cache = KVCache()
    tokens, step_input = prompt, prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(min(max_new_tokens, limit)):
        engram = cache.hash_ids(hasher, step_input) if hasher is not None else None
        logits = model(step_input, engram=engram, cache=cache).logits[:, -1]
        if logits_out is not None:
            logits_out.append(logits)
        new = next_token(logits, temperature, top_p, gen)
        if eos_id is not None:
            new = torch.where(done, torch.full_like(new, eos_id), new)
            done |= new == eos_id
        tokens = torch.cat([tokens, new[:, None]], dim=1)
        step_input = new[:, None]
        if eos_id is not None and bool(done.all()):
            break
    return tokens
