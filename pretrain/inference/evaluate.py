"""``python -m launch.evaluate --checkpoint DIR (--text FILE | --ids FILE.npy)``
``python -m launch.evaluate --checkpoint DIR --probe niah_mq,vt,ppl_by_position --lengths
512,1024,2048 --text HAYSTACK_FILE_OR_DIR [--samples 8] [--out DIR]``
(``pretrain.inference.probes``)

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

import torch

from data.tokenizer import load_tokenizer
from pretrain.checkpoint_reader import CheckpointError, hasher_for, load_model
from pretrain.inference.windows import document_ids, mean_loss, text_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a DCP step folder or run folder")
    parser.add_argument("--text", help="a UTF-8 text file: one document")
    parser.add_argument("--ids", help="a 1-D .npy array of token ids")
    parser.add_argument("--tokenizer", help="the tokenizer file, when not where it was trained")
    parser.add_argument("--config", help="an old checkpoint without model_args: config.toml")
    parser.add_argument("--seq_len", type=int, default=0, help="window length (0: max_seq_len)")
    parser.add_argument(
        "--probe", default="", help="niah_mq,vt,ppl_by_position (pretrain.inference.probes)"
    )
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
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"tokens: {ids.size}")
    print(f"loss: {loss:.6f}")
    return 0


def probe_main(ns) -> int:
    """``--probe``: RULER-style probes over haystacks cut from ``--text`` (a file or folder)."""
    import json

    from pretrain.inference.generate import generate as decode
    from pretrain.inference.probes import Haystack, plot_probes, run_probes

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
        haystack = Haystack(text_ids([Path(ns.text)], tok_path))
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
            ns.probe.split(","),
            lengths,
            generate=generate,
            encode=tok.encode,
            decode=tok.decode,
            haystack=haystack,
            samples=ns.samples,
            model=model,
            hasher=hasher,
        )
    except (CheckpointError, ValueError, FileNotFoundError, ImportError) as err:
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
