"""Time to recover a lost replica group (fault tolerance), against what a requeue would cost.

2 replica groups x 2 CPU (gloo) ranks of the ``debug`` flavor with table shards in each group
(``pretrain/configs/debug_ft.toml``, demo corpus), a lighthouse in this process. Group 1 is
SIGKILLed at step ``--kill_at`` and restarted at once (``launch.fault_drill``); per table
placement the table gives:
- ``alone``: steps group 0 committed while group 1 was away (training never stopped);
- ``rejoin_s``: restart to group 1's first step with group 0 (process start-up, model build,
  durable resume, quorum, state transfer);
- ``recovery_s``: the state transfer and load inside the quorum (``ft/recovery_s``);
- ``state_MiB``: the state that crossed (each group's ranks together);
- ``requeue_s``: what the failure would have cost without fault tolerance: every group restarts
  (``rejoin_s`` stands for one restart here) and recomputes the steps since the last durable
  checkpoint (``--interval`` / 2 on average, at the measured step time);
- ``identical``: both groups ended with the same sha256 on every rank.

Run: .venv/bin/python -m benchmarks.ft_recovery [--steps 60] [--kill_at 10] [--interval 20]
     [--placements device,host,disk] [--table_gib 0.5] [--transport http]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import print_table
from benchmarks.engram_offload import table_overrides
from launch.fault_drill import ReplicaGroups, drill, start_lighthouse
from pretrain.config import load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--kill_at", type=int, default=10)
    parser.add_argument("--interval", type=int, default=20)
    parser.add_argument("--placements", default="device,host")
    parser.add_argument("--transport", default="auto", choices=["auto", "pg", "http"])
    parser.add_argument(
        "--table_gib", type=float, default=0.0, help="tables of this size (0: the recipe's)"
    )
    args = parser.parse_args(argv)
    config = "pretrain/configs/debug_ft.toml"
    tables = table_overrides(config, args.table_gib) if args.table_gib else []
    lighthouse = start_lighthouse()
    rows = []
    try:
        for placement in args.placements.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                groups = ReplicaGroups(
                    Path(tmp) / "run",
                    lighthouse.address(),
                    [
                        "--config",
                        config,
                        *tables,
                        f"--training.steps={args.steps}",
                        f"--checkpoint.interval={args.interval}",
                        "--metrics.log_freq=1",
                        "--metrics.enable_tensorboard=false",
                        "--metrics.progress_bar=false",
                        "--data.num_workers=0",
                        "--training.num_threads=1",
                        f"--engram_table.placement={placement}",
                        "--engram_table.cache_size=10%"
                        if tables
                        else "--engram_table.cache_size=50%",
                        "--fault_tolerance.state_digest=true",
                        f"--fault_tolerance.transport={args.transport}",
                    ],
                )
                result = drill(groups, kill_group=1, kill_at=args.kill_at)
                losses = groups.losses(0)
                tps = [r["tps"] for s, r in losses.items() if s > 2 and "tps" in r]
                # tps is per device: a rank's batch_size x seq_len tokens per step
                cfg = load_config(config)
                step_s = cfg.training.batch_size * cfg.data.seq_len / (sum(tps) / len(tps))
                requeue_s = result["restart_to_rejoin_s"] + args.interval / 2 * step_s
            rows.append(
                [
                    placement,
                    result["killed_at_step"],
                    result["steps_without_it"],
                    f"{result['restart_to_rejoin_s']:.1f}",
                    f"{result['recovery_s']:.3f}",
                    f"{result['state_mib_per_group']:.1f}",
                    f"{step_s:.2f}",
                    f"{requeue_s:.1f}",
                    result["bit_identical"],
                ]
            )
    finally:
        lighthouse.shutdown()
    print_table(
        [
            "tables",
            "killed at",
            "alone",
            "rejoin_s",
            "recovery_s",
            "state_MiB",
            "step_s",
            "requeue_s",
            "identical",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
