"""Engram tables off the device: step time of the host and disk placements against device.

Default: the demo model, one trainer per arm in one process, rounds alternating between the arms
(these machines are noisy). Arms: device; host with and without prefetch; disk with a cache of
``--cache`` of the rows, with and without prefetch. The last lines are
``ratio_host_vs_device: R`` and ``ratio_disk_vs_device: R`` (with prefetch; targets <= 1.03 and
<= 1.10).

``--big --table_gib G``: the demo model with a disk table of G GiB of parameters (its Adam state
beside it, so 3G GiB of files in ``--dir``, removed afterwards) and a cache of at most 2 GiB,
beside one table of ``--same_gib`` GiB (default 1) timed in both placements, in memory and on
disk: like for like, the same rows, primes and state. ``--big_steps`` steps (default 50) per arm,
in ``--rounds`` rounds whose arm order turns every round; every arm's time includes waiting for
its prefetch and write-behind threads (``settle``).
Prints ``table_gib``, ``state_gib``, ``steps``, ``tokens_per_s``, ``peak_rss_anon_gib`` (RssAnon:
page cache does not count), ``ratio_same_table_disk_vs_device`` and ``ratio_big_vs_device``
(targets: <= 6 GiB and <= 1.25).

Run: .venv/bin/python -m benchmarks.engram_offload [--rounds 3 --steps 6]
     .venv/bin/python -m benchmarks.engram_offload --big --table_gib 12 [--dir /nvme/tmp]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import bench_overrides, print_table
from models.tables.offload import tier_scalars
from pretrain.config import load_config
from pretrain.train import Trainer

ARMS = {
    "device": [],
    "host": ["--engram_table.placement=host"],
    "host_no_prefetch": ["--engram_table.placement=host", "--engram_table.prefetch=false"],
    "disk": ["--engram_table.placement=disk"],
    "disk_no_prefetch": ["--engram_table.placement=disk", "--engram_table.prefetch=false"],
}


def build(config: str, dump: Path, extra: list[str]) -> Trainer:
    return Trainer(load_config(config, [*bench_overrides(dump), *extra]))


def rss_anon_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def settle(trainer: Trainer) -> None:
    """Wait for what a step left running: the tables' prefetch threads and write-behinds, and
    the device's queue, so that a timer stopped after this has paid for all of it."""
    if trainer.tables:
        for table in trainer.tables.tables.values():
            table.cache.wait()
            table.store.drain()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)


def alternate(trainers: dict[str, Trainer], rounds: int, steps: int) -> dict[str, dict]:
    """Median seconds per step and tier metrics per arm. Each round times every arm for
    ``steps`` steps, up to the end of its background work (``settle``); the arms' order turns
    by one every round, so no arm always follows the same one."""
    times = {name: [] for name in trainers}
    tier = {name: 0.0 for name in trainers}
    for trainer in trainers.values():  # warm-up (and first cache fill) of every arm
        trainer.train_step()
        settle(trainer)
        trainer.tables.take_stats() if trainer.tables else None
    peak = rss_anon_gib()
    names = list(trainers)
    for round_ in range(rounds):
        turn = round_ % len(names)
        for name in names[turn:] + names[:turn]:
            trainer = trainers[name]
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
                peak = max(peak, rss_anon_gib())
            settle(trainer)
            elapsed = time.perf_counter() - start
            times[name].append(elapsed / steps)
            tier[name] += elapsed
            print(
                f"round {round_ + 1}/{rounds}, {name}: {steps} steps, {elapsed / steps:.3f} s/step",
                flush=True,
            )
    out = {}
    for name, trainer in trainers.items():
        scalars = tier_scalars(trainer.tables.take_stats(), tier[name]) if trainer.tables else {}
        out[name] = {"seconds": statistics.median(times[name]), **scalars}
    out["_peak_rss_anon_gib"] = peak
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="pretrain/configs/demo.toml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cache", default="10%", help="disk arms' engram_table.cache_size")
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--table_gib", type=float, default=12.0)
    parser.add_argument("--dir", default=None, help="--big: where the table files go")
    parser.add_argument("--big_steps", type=int, default=50, help="--big: steps per arm")
    parser.add_argument(
        "--same_gib",
        type=float,
        default=1.0,
        help="--big: the table timed both in memory and on disk (its Adam state triples it)",
    )
    ns, extra = parser.parse_known_args()
    work = Path(tempfile.mkdtemp(prefix="engram_offload_", dir=ns.dir))
    try:
        if ns.big:
            run_big(ns, extra, work)
        else:
            run_arms(ns, extra, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_arms(ns, extra: list[str], work: Path) -> None:
    # batch 4: the cache's floor (two microbatches' lookups) stays under 10% of the demo rows
    common = ["--training.batch_size=4", f"--engram_table.cache_size={ns.cache}", *extra]
    trainers = {name: build(ns.config, work / name, common + a) for name, a in ARMS.items()}
    results = alternate(trainers, ns.rounds, ns.steps)
    cfg = trainers["device"].cfg
    tokens = cfg.training.batch_size * cfg.data.seq_len * cfg.training.grad_accum_steps
    base = results["device"]["seconds"]
    rows = []
    for name, trainer in trainers.items():
        r = results[name]
        slots = (
            [t.cache.num_slots for t in trainer.tables.tables.values()] if trainer.tables else []
        )
        rows.append(
            [
                name,
                r["seconds"],
                tokens / r["seconds"],
                r["seconds"] / base,
                f"{slots[0] / trainer.tables.tables[0].num_rows:.1%}" if slots else "-",
                r.get("engram/cache_hit_rate", float("nan")),
                r.get("engram/prefetch_wait(%)", float("nan")),
                r.get("engram/read_MiB_per_s", float("nan")),
            ]
        )
        trainer.loader.close()
    print_table(
        ["arm", "s/step", "tokens/s", "vs device", "cache", "hit rate", "wait %", "read MiB/s"],
        rows,
    )
    print(f"ratio_host_vs_device: {results['host']['seconds'] / base:.3f}")
    print(f"ratio_disk_vs_device: {results['disk']['seconds'] / base:.3f}")


def engram_args(config: str):
    from models.flavors import resolve_model_args

    cfg = load_config(config)
    return resolve_model_args(cfg.model.flavor, cfg.model.overrides, vocab_size=16000).engram


def table_overrides(config: str, gib: float) -> list[str]:
    """Overrides that give the config's Engram layers tables of ``gib`` GiB of parameters."""
    e = engram_args(config)
    rows_per_layer = int(gib * 2**30 / 4 / e.head_dim / len(e.layer_ids))
    per_head = [rows_per_layer // e.num_heads] * (e.max_ngram_size - 1)  # primes near this
    return [f"--model.overrides.engram.hash.engram_vocab_size={per_head}"]


def run_big(ns, extra: list[str], work: Path) -> None:
    layers = len(engram_args(ns.config).layer_ids)
    disk = [
        "--engram_table.placement=disk",
        f"--engram_table.cache_size={2 * 2**30 // layers}B",
    ]
    same = table_overrides(ns.config, ns.same_gib)
    started = time.perf_counter()
    trainers = {  # the same table (rows, primes, state) in memory and on disk, and a big one
        "device": build(ns.config, work / "device", [*same, *extra]),
        "disk": build(
            ns.config, work / "disk", [*same, *disk, f"--engram_table.path={work / 'same'}", *extra]
        ),
        "big": build(
            ns.config,
            work / "big",
            [
                *table_overrides(ns.config, ns.table_gib),
                *disk,
                f"--engram_table.path={work / 'tables'}",
                *extra,
            ],
        ),
    }
    print(f"set-up (table files created and initialised): {time.perf_counter() - started:.0f} s")
    steps_per_round = -(-ns.big_steps // ns.rounds)  # at least --big_steps in all
    results = alternate(trainers, ns.rounds, steps_per_round)
    c = trainers["big"].cfg
    tokens = c.training.batch_size * c.data.seq_len * c.training.grad_accum_steps
    rows = []
    for name, trainer in trainers.items():
        tables = list(trainer.tables.tables.values()) if trainer.tables else []
        if tables:
            table_bytes = sum(t.num_rows * t.head_dim * 4 for t in tables)
        else:
            table_bytes = sum(e.table.weight.numel() * 4 for e in trainer.inner.engram_layers())
        rows.append(
            [
                name,
                table_bytes / 2**30,
                results[name]["seconds"],
                tokens / results[name]["seconds"],
                *(
                    results[name].get(k, float("nan"))
                    for k in (
                        "engram/cache_hit_rate",
                        "engram/prefetch_wait(%)",
                        "engram/read_MiB_per_s",
                    )
                ),
            ]
        )
    print_table(
        ["arm", "table GiB", "s/step", "tokens/s", "hit rate", "wait %", "read MiB/s"], rows
    )
    big_tables = trainers["big"].tables.tables.values()
    state_bytes = sum(t.num_rows * (t.store.width - t.head_dim) * 4 for t in big_tables)
    for trainer in trainers.values():
        trainer.loader.close()
    device_s = results["device"]["seconds"]
    print(f"table_gib: {rows[2][1]:.2f}")
    print(f"state_gib: {state_bytes / 2**30:.2f}")
    print(f"steps: {ns.rounds * steps_per_round}")
    print(f"tokens_per_s: {tokens / results['big']['seconds']:.0f}")
    print(f"peak_rss_anon_gib: {results['_peak_rss_anon_gib']:.2f}")
    print(f"ratio_same_table_disk_vs_device: {results['disk']['seconds'] / device_s:.3f}")
    print(f"ratio_big_vs_device: {results['big']['seconds'] / device_s:.3f}")


if __name__ == "__main__":
    main()
