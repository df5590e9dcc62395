"""``python -m launch.analyze TOOL --checkpoint A [--checkpoint B ...] (--text FILE |
--source NAME=FILE_OR_DIR) --out DIR [--seq_len T] [--windows N]``

The analysis tools behind the paper's claims on DCP checkpoints (``pretrain.inference.analyze``):

``python -m launch.analyze logit_lens --checkpoint A [--checkpoint B ...] --text FILE --out DIR``
``python -m launch.analyze cka --checkpoint A --checkpoint B --text FILE --out DIR``
``python -m launch.analyze gates --checkpoint A --text FILE --out DIR``
``python -m launch.analyze ablation --checkpoint A --source code=DIR --source prose=F --out DIR``

Each writes ``TOOL.json`` and a PNG (plus ``gates.html`` for gate maps) into ``--out``. Text is
tokenised as the loader does (ids, then EOS per file) and cut into windows of ``--seq_len`` tokens
(default: the model's ``max_seq_len``), as ``launch.evaluate`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.checkpoint_reader import CheckpointError
from pretrain.inference.analyze import run_analysis


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.analyze", description=__doc__)
    p.add_argument("tool", choices=("logit_lens", "cka", "gates", "ablation"))
    p.add_argument("--checkpoint", action="append", required=True)
    p.add_argument("--text", action="append", default=[], help="text file or folder")
    p.add_argument("--source", action="append", default=[], help="ablation: NAME=FILE_OR_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--seq_len", type=int, default=0)
    p.add_argument("--windows", type=int, default=16, help="at most this many windows")
    ns = p.parse_args(argv)
    try:
        result, png = run_analysis(
            ns.tool, ns.checkpoint, Path(ns.out), ns.text, ns.source, ns.seq_len, ns.windows
        )
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result if ns.tool != "gates" else {"png": str(png)}, indent=1)[:2000])
    if png is not None:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
