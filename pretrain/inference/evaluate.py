"""A checkpoint's mean next-token loss on one document (``python -m launch.evaluate``), and the
long-context probes run on a checkpoint (``--probe``).

The ids are cut into consecutive windows of ``seq_len`` tokens (default: the model's
``max_seq_len``); each window is a sequence of its own (positions from 0, Engram look-back padded)
and predicts its next tokens, the last one included when the document goes on. With one window,
transformers' ``model(ids, labels=ids).loss`` is the same number.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data.tokenizer import load_tokenizer
from pretrain.checkpoint_reader import hasher_for, load_model
from pretrain.inference.windows import document_ids, mean_loss, text_ids


def checkpoint_loss(
    checkpoint: str,
    text: str | None = None,
    ids_file: str | None = None,
    *,
    config: str | None = None,
    tokenizer: str | None = None,
    seq_len: int = 0,
    max_seq_len: int = 0,
) -> tuple[int, float]:
    """``(tokens in the document, mean loss over its N - 1 predictions)`` of ``checkpoint``'s
    model on ``text`` (tokenised as the loader does: ids, then EOS) or ``ids_file`` (a 1-D
    ``.npy`` of ids, used as given). Raises ``CheckpointError``/``ValueError`` on bad input."""
    model, args, tok_path = load_model(checkpoint, config, tokenizer, max_seq_len or None)
    ids = document_ids(text, ids_file, tok_path)
    seq_len = seq_len or args.max_seq_len
    if seq_len > args.max_seq_len:
        raise ValueError(f"--seq_len {seq_len} exceeds the model's max_seq_len")
    return int(ids.size), mean_loss(model, args, hasher_for(args, tok_path), ids, seq_len)


def probe_checkpoint(
    checkpoint: str,
    probes: list[str],
    lengths: list[int],
    text: str,
    *,
    samples: int = 8,
    config: str | None = None,
    tokenizer: str | None = None,
    max_seq_len: int = 0,
) -> dict:
    """RULER-style probes (``pretrain.inference.probes``) of ``checkpoint`` over haystacks cut
    from ``text`` (a file or folder), at each context length of ``lengths``."""
    from pretrain.inference.generate import generate as decode
    from pretrain.inference.probes import Haystack, run_probes

    if not text:
        raise ValueError("--probe needs --text FILE_OR_DIR: the haystack's filler text")
    model, args, tok_path = load_model(checkpoint, config, tokenizer, max_seq_len or None)
    longest = max(lengths) + 48  # room for the answer
    if longest > args.max_seq_len:
        raise ValueError(
            f"--lengths up to {max(lengths)} need max_seq_len >= {longest}, the model has "
            f"{args.max_seq_len}: extend it first (pretrain/configs/demo_extend_2k.toml)"
        )
    haystack = Haystack(text_ids([Path(text)], tok_path))
    tok, hasher = load_tokenizer(tok_path), hasher_for(args, tok_path)

    @torch.no_grad()
    def generate(prompt: list[int], max_new: int) -> list[int]:
        room = args.max_seq_len - len(prompt)
        if room <= 0:
            raise ValueError(
                f"a probe prompt of {len(prompt)} tokens leaves no room within max_seq_len="
                f"{args.max_seq_len}: lower --lengths"
            )
        ids = torch.tensor([prompt])
        return decode(model, hasher, ids, min(max_new, room))[0, ids.shape[1] :].tolist()

    results = run_probes(
        probes,
        lengths,
        generate=generate,
        encode=tok.encode,
        decode=tok.decode,
        haystack=haystack,
        samples=samples,
        model=model,
        hasher=hasher,
    )
    results["checkpoint"] = str(checkpoint)
    return results
