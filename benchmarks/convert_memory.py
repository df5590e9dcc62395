"""Peak memory of checkpoint conversion on a checkpoint larger than the memory it may use.

Writes a synthetic DCP checkpoint of the ``debug`` flavor whose Engram table holds ``--gib`` GiB
(rows generated block by block, so writing it is streamed too), then converts it with
``python -m launch.convert dcp-to-hf`` and back with ``hf-to-dcp``, each in a fresh process,
and prints a table of wall time and peak RSS (VmHWM: everything resident, page cache of mapped
files included). Target: peak RSS under 3 GiB for a checkpoint of at least 8 GiB. The files go
in ``--dir`` (default: a temporary folder) and are removed afterwards.

Run: .venv/bin/python -m benchmarks.convert_memory [--gib 8] [--dir /nvme/tmp]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import print_table

CHILD = """
import sys
from launch.convert import main
code = main(sys.argv[1:])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("peak_rss_kib", int(line.split()[1]))
sys.exit(code)
"""


def synthetic_checkpoint(folder: Path, gib: float) -> int:
    """A one-rank DCP checkpoint of ``debug`` with a table of about ``gib`` GiB; its bytes."""
    from data.tokenizer import deepseek_v3_tokenizer_path
    from models.args import ModelArgs
    from models.flavors import get_flavor
    from models.hf.layouts import Source
    from models.hf.safetensors_io import TensorEntry
    from models.transformer import Transformer
    from pretrain.conversion import convert

    args: ModelArgs = get_flavor("debug")
    e = args.engram
    per_head = int(gib * 2**30 / (e.head_dim * 4) / e.num_heads)
    e.hash.engram_vocab_size = [per_head] * (e.max_ngram_size - 1)
    tok = deepseek_v3_tokenizer_path()
    with torch.device("meta"):
        model = Transformer(args)

    def rows(entry: TensorEntry):
        def read(a: int, b: int) -> torch.Tensor:
            gen = torch.Generator().manual_seed(a)
            return (torch.randn(b - a, *entry.shape[1:], generator=gen) * 0.02).to(entry.dtype)

        return read

    sources = {}
    for name, value in model.state_dict().items():
        entry = TensorEntry(name, tuple(value.shape), value.dtype)
        sources[name] = Source(entry, rows(entry) if value.dim() else lambda a, b: torch.zeros(1))
    meta = convert.checkpoint_meta(args, convert.hasher_for(args, tok), tok, "synthetic")
    total = sum(s.entry.nbytes for s in sources.values())
    with convert.atomic_folder(folder) as tmp, convert.progress_bar(total, "synthetic") as bar:
        convert.save_dcp(tmp, sources, meta, bar)
    return total


def run_child(*argv: str) -> tuple[float, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"launch.convert {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    kib = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("peak")]
    return time.perf_counter() - start, kib[0] / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=8.0, help="synthetic table size")
    parser.add_argument("--dir", default=None)
    ns = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert_memory_", dir=ns.dir))
    try:
        start = time.perf_counter()
        total = synthetic_checkpoint(work / "dcp", ns.gib)
        print(
            f"synthetic checkpoint: {total / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s"
        )
        rows = []
        for command, src, out in (
            ("dcp-to-hf", "dcp", "hf"),
            ("hf-to-dcp", "hf", "back"),
        ):
            seconds, peak = run_child(
                command, "--checkpoint", str(work / src), "--out", str(work / out)
            )
            rows.append([command, total / 2**30, seconds, total / 2**20 / seconds, peak])
            print(f"{command}: {seconds:.0f} s, peak RSS {peak:.2f} GiB", flush=True)
        print_table(["conversion", "GiB", "seconds", "MiB/s", "peak RSS GiB"], rows)
        print(f"checkpoint_gib: {total / 2**30:.2f}")
        print(f"peak_rss_gib: {max(r[4] for r in rows):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
