"""``python -m pretrain.evaluate --checkpoint DIR (--text FILE | --ids FILE.npy)``
``python -m pretrain.evaluate --checkpoint DIR --probe niah_mq,vt,ppl_by_position --lengths
512,1024,2048 --text HAYSTACK_FILE_OR_DIR [--samples 8] [--out DIR]`` (``pretrain.probes``)

The mean next-token loss of a DCP checkpoint's model on one document, to compare with the same
number from an exported Hugging Face folder (docs/conversion.md).

- ``--text``: the file is tokenised as one document exactly as the data loader does it (the
  tokenizer's ids, then EOS).
- ``--ids``: a 1-D ``.npy`` array of token ids, used as given.

The ids are cut into consecutive windows of ``--seq_len`` tokens (default: the model's
``max_seq_len``); each window is a sequence of its own (positions from 0, Engram look-back padded)
and predicts its next tokens, the last one included when the document goes on. Prints
``tokens: N`` (ids in the document) and ``loss: X`` (mean over the ``N - 1`` predictions).
With one window, transformers' ``model(ids, labels=ids).loss`` is the same number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.tokenizer import load_tokenizer
from pretrain.convert import ConversionError, hasher_for, load_model


def document_ids(text_file: str | None, ids_file: str | None, tokenizer_path: Path) -> np.ndarray:
    if (text_file is None) == (ids_file is None):
        raise ValueError("pass exactly one of --text FILE and --ids FILE.npy")
    if ids_file is not None:
        ids = np.load(ids_file)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"{ids_file}: expected a 1-D integer array, got {ids.dtype}{ids.shape}"
            )
        return ids.astype(np.int64)
    tok = load_tokenizer(tokenizer_path)
    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    return np.asarray(tok.encode(text) + [tok.eos_id], dtype=np.int64)  # as data.prepare


def windows(ids: np.ndarray, seq_len: int, limit: int | None = None) -> list[np.ndarray]:
    """Consecutive windows of ``seq_len + 1`` ids (inputs and their next tokens); each is a
    sequence of its own."""
    out = [ids[s : s + seq_len + 1] for s in range(0, max(1, ids.size - 1), seq_len)]
    out = [w for w in out if w.size >= 2]
    return out[:limit] if limit else out


def engram_inputs(hasher, tokens: np.ndarray):
    """The hash ids of ``tokens [T]`` (a batch of one) as the model takes them."""
    if hasher is None:
        return None
    return {k: torch.from_numpy(v) for k, v in hasher.hash(tokens[None]).items()}


def forward_window(model, hasher, window: np.ndarray):
    """The model's output on a window's inputs (all but its last id)."""
    tokens = torch.from_numpy(window[:-1]).unsqueeze(0)
    return model(tokens, engram=engram_inputs(hasher, window[:-1]))


@torch.no_grad()
def windows_loss(model, hasher, wins: list[np.ndarray]) -> float:
    """Mean next-token loss over every prediction of ``wins``."""
    total, count = 0.0, 0
    for window in wins:
        logits = forward_window(model, hasher, window).logits[0].float()
        labels = torch.from_numpy(window[1:])
        total += F.cross_entropy(logits, labels, reduction="sum").item()
        count += labels.numel()
    return total / count


def mean_loss(model, args, hasher, ids: np.ndarray, seq_len: int) -> float:
    if ids.size < 2:
        raise ValueError("the document has fewer than 2 tokens: nothing to predict")
    if ids.max() >= args.vocab_size:
        raise ValueError(f"token id {int(ids.max())} is outside the model's {args.vocab_size}")
    return windows_loss(model, hasher, windows(ids, seq_len))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a DCP step folder or run folder")
    parser.add_argument("--text", help="a UTF-8 text file: one document")
    parser.add_argument("--ids", help="a 1-D .npy array of token ids")
    parser.add_argument("--tokenizer", help="the tokenizer file, when not where it was trained")
    parser.add_argument("--config", help="an old checkpoint without model_args: config.toml")
    parser.add_argument("--seq_len", type=int, default=0, help="window length (0: max_seq_len)")
    parser.add_argument("--probe", default="", help="niah_mq,vt,ppl_by_position (pretrain.probes)")
    parser.add_argument("--lengths", default="512,1024,2048", help="probe context lengths")
    parser.add_argument("--samples", type=int, default=8, help="probe samples per length")
    parser.add_argument("--out", default="", help="probes: folder for probes.json and probes.png")
    parser.add_argument(
        "--max_seq_len",
        type=int,
        default=0,
        help="run the model at more positions than trained (no YaRN): a before-extension baseline",
    )
    ns = parser.parse_args(argv)
    if ns.probe:
        return probe_main(ns)
    try:
        model, args, tok_path = load_model(
            ns.checkpoint, ns.config, ns.tokenizer, ns.max_seq_len or None
        )
        ids = document_ids(ns.text, ns.ids, tok_path)
        seq_len = ns.seq_len or args.max_seq_len
        if seq_len > args.max_seq_len:
            raise ValueError(f"--seq_len {seq_len} exceeds the model's max_seq_len")
        loss = mean_loss(model, args, hasher_for(args, tok_path), ids, seq_len)
    except (ConversionError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"tokens: {ids.size}")
    print(f"loss: {loss:.6f}")
    return 0


def probe_main(ns) -> int:
    """``--probe``: RULER-style probes over haystacks cut from ``--text`` (a file or folder)."""
    import json

    from pretrain.generate import inference_model
    from pretrain.probes import Haystack, plot_probes, run_probes

    try:
        if not ns.text:
            raise ValueError("--probe needs --text FILE_OR_DIR: the haystack's filler text")
        lengths = [int(x) for x in ns.lengths.split(",") if x]
        model, args, tok_path = load_model(
            ns.checkpoint, ns.config, ns.tokenizer, ns.max_seq_len or None
        )
        longest = max(lengths) + 48  # room for the answer
        if longest > args.max_seq_len:
            raise ValueError(
                f"--lengths up to {max(lengths)} need max_seq_len >= {longest}, the model has "
                f"{args.max_seq_len}: extend it first (pretrain/configs/demo_extend_2k.toml)"
            )
        from pretrain.analyze import _text_ids

        haystack = Haystack(_text_ids([Path(ns.text)], tok_path))
        generator, tok = inference_model(ns.checkpoint, ns.tokenizer, ns.config, ns.max_seq_len)

        @torch.no_grad()
        def generate(prompt: list[int], max_new: int) -> list[int]:
            room = args.max_seq_len - len(prompt)
            if room <= 0:
                raise ValueError(
                    f"a probe prompt of {len(prompt)} tokens leaves no room within max_seq_len="
                    f"{args.max_seq_len}: lower --lengths"
                )
            max_new = min(max_new, room)
            ids = torch.tensor([prompt])
            out = generator.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=0)
            return out[0, ids.shape[1] :].tolist()

        results = run_probes(
            ns.probe.split(","),
            lengths,
            generate=generate,
            encode=tok.encode,
            decode=tok.decode,
            haystack=haystack,
            samples=ns.samples,
            model=model,
            hasher=hasher_for(args, tok_path),
        )
    except (ConversionError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results["checkpoint"] = str(ns.checkpoint)
    print(json.dumps(results))
    if ns.out:
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probes.json").write_text(json.dumps(results, indent=1) + "\n")
        if plot_probes(results, out / "probes.png"):
            print(f"wrote {out / 'probes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
