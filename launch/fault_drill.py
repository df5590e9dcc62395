"""``python -m launch.fault_drill``: lose a replica group on purpose and watch the job survive.

Starts a torchft lighthouse in this process and ``--groups`` replica groups of ``--ranks`` CPU
(gloo) processes of the trainer on this machine, SIGKILLs group ``--kill_group`` once it has
committed ``--kill_at`` steps, restarts it at once, and reports what the failure cost:

    python -m launch.fault_drill --config pretrain/configs/debug_ft.toml --kill_at 10 \\
        -- --training.steps=60

The table: the steps the other groups committed while the group was away, the seconds from the
restart to the group's first step with its peers (process start-up included), the seconds its
recovery took inside the quorum (state transfer and load, ``ft/recovery_s``), the state that
crossed, and whether every group ended with the same bits (``fault_tolerance.state_digest``).
``ReplicaGroups`` is what the fault-tolerance tests and ``benchmarks/ft_recovery.py`` drive.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from parallel.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def start_lighthouse(min_replicas: int = 1, join_timeout_ms: int = 1000):
    """A torchft lighthouse in this process (``.address()``, ``.shutdown()``)."""
    os.environ.setdefault("RUST_LOG", "warn")  # it logs every quorum at info
    from torchft._torchft import LighthouseServer

    return LighthouseServer(
        bind="[::]:0",
        min_replicas=min_replicas,
        join_timeout_ms=join_timeout_ms,
        quorum_tick_ms=10,
        heartbeat_timeout_ms=2000,
    )


class ReplicaGroups:
    """Replica groups of the training CLI as plain processes (rank variables set here, one TCP
    store per group on 127.0.0.1), with per-rank logs beside the dump folder."""

    def __init__(
        self, dump: Path, lighthouse: str, args: list[str], groups: int = 2, ranks: int = 2
    ):
        self.dump, self.lighthouse, self.args = Path(dump), lighthouse, list(args)
        self.groups, self.ranks = groups, ranks
        self.procs: dict[int, list[subprocess.Popen]] = {}
        self.started: dict[int, float] = {}

    def launch(self, group: int) -> None:
        port = free_port()
        self.dump.parent.mkdir(parents=True, exist_ok=True)
        self.procs[group], self.started[group] = [], time.time()
        for rank in range(self.ranks):
            env = dict(
                os.environ,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                RANK=str(rank),
                WORLD_SIZE=str(self.ranks),
                LOCAL_RANK=str(rank),
                PYTHONPATH=str(REPO),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
            )
            cmd = [
                sys.executable,
                "-m",
                "pretrain.train",
                *self.args,
                f"--job.dump_folder={self.dump}",
                "--fault_tolerance.enable=true",
                f"--fault_tolerance.replica_id={group}",
                f"--fault_tolerance.group_size={self.groups}",
                f"--fault_tolerance.lighthouse={self.lighthouse}",
            ]
            attempt = len(list(self.dump.parent.glob(f"{self.dump.name}_g{group}_r{rank}_*.log")))
            log = open(self.dump.parent / f"{self.dump.name}_g{group}_r{rank}_{attempt}.log", "w")
            self.procs[group].append(
                subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            )

    def launch_all(self) -> None:
        for group in range(self.groups):
            self.launch(group)

    def kill(self, group: int) -> None:
        for proc in self.procs[group]:
            proc.send_signal(signal.SIGKILL)
        for proc in self.procs[group]:
            proc.wait()

    def kill_all(self) -> None:
        for group in list(self.procs):
            self.kill(group)

    def wait(self, timeout: float = 600) -> None:
        """Wait for every process; a nonzero exit raises with the tails of the logs."""
        deadline = time.time() + timeout
        for procs in self.procs.values():
            for proc in procs:
                try:
                    rc = proc.wait(timeout=max(1.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    self.kill_all()
                    raise RuntimeError(
                        f"the replica groups ran past {timeout} s\n{self.tails()}"
                    ) from None
                if rc != 0:
                    self.kill_all()
                    raise RuntimeError(f"a rank exited with {rc}\n{self.tails()}")

    def tails(self, chars: int = 2000) -> str:
        logs = sorted(self.dump.parent.glob(f"{self.dump.name}_g*.log"))
        return "\n".join(f"== {p.name}\n{p.read_text()[-chars:]}" for p in logs)

    def wait_for_step(
        self, group: int, step: int, timeout: float = 300, with_peers: bool = False
    ) -> int:
        """Wait until ``group`` has logged ``step`` (and, ``with_peers``, has committed a step
        together with every group: a group that starts late joins some steps in)."""
        deadline = time.time() + timeout
        while time.time() < deadline and (
            self.last_step(group) < step or (with_peers and not self.trained_together(group))
        ):
            if any(p.poll() not in (None, 0) for p in self.procs[group]):
                raise RuntimeError(f"group {group} died\n{self.tails()}")
            time.sleep(0.05)
        return self.last_step(group)

    # ----- what the groups wrote -----
    def records(self, group: int, name: str) -> list[dict]:
        path = self.dump / f"replica_{group}" / name
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def losses(self, group: int) -> dict[int, dict]:
        return {r["step"]: r for r in self.records(group, "metrics.jsonl") if "loss" in r}

    def trained_together(self, group: int, since: int = 0) -> bool:
        """Whether ``group`` committed a step with every group (among its records from the
        ``since``-th on: a restarted group's own)."""
        everyone = list(range(self.groups))
        committed = self.records(group, "committed.jsonl")[since:]
        return any(r["committed"] and r["replicas"] == everyone for r in committed)

    def last_step(self, group: int) -> int:
        return max(self.losses(group), default=0)

    def digests(self, group: int) -> list[dict]:
        folder = self.dump / f"replica_{group}"
        return [
            json.loads((folder / f"state_digest_rank{r}.json").read_text())
            for r in range(self.ranks)
        ]


def drill(groups: ReplicaGroups, kill_group: int, kill_at: int) -> dict:
    """Kill ``kill_group`` at step ``kill_at``, restart it, wait for the end; what it cost."""
    groups.launch_all()
    groups.wait_for_step(kill_group, kill_at, with_peers=True)
    groups.kill(kill_group)
    killed_at = max(groups.last_step(g) for g in range(groups.groups))
    before = len(groups.records(kill_group, "committed.jsonl"))
    everyone = list(range(groups.groups))
    groups.launch(kill_group)
    restarted, rejoin_s = time.time(), None
    while any(p.poll() is None for procs in groups.procs.values() for p in procs):
        # the restarted group's first step with every peer
        if rejoin_s is None and groups.trained_together(kill_group, since=before):
            rejoin_s = time.time() - restarted
        time.sleep(0.05)
    groups.wait()
    peer = next(g for g in everyone if g != kill_group)
    committed = [r for r in groups.records(peer, "committed.jsonl") if r["committed"]]
    alone = [r["step"] for r in committed if r["step"] > killed_at and r["replicas"] != everyone]
    recovered = [r for r in groups.losses(kill_group).values() if r.get("ft/recoveries", 0) >= 1]
    digests = {g: groups.digests(g) for g in everyone}
    return {
        "killed_at_step": killed_at,
        "steps_without_it": len(alone),
        "restart_to_rejoin_s": rejoin_s,
        "recovery_s": recovered[0]["ft/recovery_s"] if recovered else None,
        "state_mib_per_group": sum(d["bytes"] for d in digests[peer]) / 2**20,
        "bit_identical": all(d == digests[peer] for d in digests.values()),
        "final_step": digests[peer][0]["step"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="pretrain/configs/debug_ft.toml")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--kill_group", type=int, default=1)
    parser.add_argument("--kill_at", type=int, default=10)
    parser.add_argument("--dump_folder", default="outputs/fault_drill")
    parser.add_argument("overrides", nargs="*", help="--section.key=value (after --)")
    args = parser.parse_args(argv)
    if not 0 <= args.kill_group < args.groups:
        parser.error(f"--kill_group={args.kill_group}: must be in [0, --groups={args.groups})")
    lighthouse = start_lighthouse()
    groups = ReplicaGroups(
        Path(args.dump_folder),
        lighthouse.address(),
        ["--config", args.config, "--fault_tolerance.state_digest=true", *args.overrides],
        args.groups,
        args.ranks,
    )
    try:
        result = drill(groups, args.kill_group, args.kill_at)
    finally:
        groups.kill_all()
        lighthouse.shutdown()
    for key, value in result.items():
        print(f"{key:>22}  {value}")
    return 0 if result["bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
