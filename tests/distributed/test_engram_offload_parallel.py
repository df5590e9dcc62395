"""Offloaded Engram tables composed with the parallelisms, against the same layout with the tables
on the device: bit-identical losses, gradient norms, gradients and final parameters (table rows
included) on every rank.

- 2 table-parallel ranks (each rank's row shard in its tier) with DDP: host and disk, prefetch on
  and off, 20 steps; with FSDP: disk with prefetch;
- PP2 with whole tables (each stage's tables in its tier) and PP2 x table parallelism, where the
  lookups are planned (and prefetched) per pipeline microbatch.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.parity import model_args, run_layout, save_initial

pytestmark = pytest.mark.distributed


def _device_then_offloaded(rank, world, layout, args, ckpt, steps, offloads):
    """The device run, then one run per ``offloads`` entry, on the same ranks."""
    return [
        run_layout(rank, world, layout, args, ckpt, steps=steps, tables=tables)
        for tables in [None, *offloads]
    ]


def assert_identical(want, got, where: str) -> None:
    assert got.losses == want.losses, where
    assert got.grad_norms == want.grad_norms, where
    for step, (a, b) in enumerate(zip(want.grads, got.grads, strict=True)):
        assert a.keys() == b.keys(), where
        for name in a:
            assert torch.equal(a[name], b[name]), f"{where}: step {step + 1}, gradient {name}"
    assert want.state.keys() == got.state.keys(), where
    for name in want.state:
        assert torch.equal(want.state[name], got.state[name]), f"{where}: {name}"


def _check(world, layout, args, tmp_path, steps, offloads, routed_lookups=None) -> None:
    """``routed_lookups``: lookups per run that a rank holding a row-sharded layer routes by
    their prefetch (None: no layer is row-sharded)."""
    from tests.distributed.helpers import run_ranks

    ckpt = save_initial(args, tmp_path / "init")
    offloads = [{**o, "folder": str(tmp_path / f"tables{i}")} for i, o in enumerate(offloads)]
    results = run_ranks(_device_then_offloaded, world, layout, args, ckpt, steps, offloads)
    holders = 0
    for rank, (want, *runs) in results.items():
        assert len(want.losses) == steps
        for offload, got in zip(offloads, runs, strict=True):
            assert_identical(want, got, f"rank {rank}, {offload}")
            if got.reused_routes is not None:
                holders += 1
                assert got.reused_routes == (routed_lookups if offload["prefetch"] else 0)
    assert (holders > 0) == (routed_lookups is not None)


@pytest.mark.parametrize("data_parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_table_parallel_offload_is_bit_identical_to_device(data_parallel, tmp_path):
    steps = 20
    if data_parallel == "ddp":
        layout = dict(data_parallel_replicate_degree=2, engram_shard_degree=2)
        offloads = [dict(placement=p, prefetch=f) for p in ("host", "disk") for f in (True, False)]
    else:
        layout = dict(data_parallel_replicate_degree=1, engram_shard_degree=2)
        offloads = [dict(placement="disk", prefetch=True)]
    # every step's batch but the first is prefetched (one Engram layer)
    _check(2, layout, model_args(sparse=True), tmp_path, steps, offloads, steps - 1)


@pytest.mark.slow  # the table-parallel offload test is the default twin
@pytest.mark.parametrize("world, tables", [(2, 1), (4, 2)], ids=["pp2", "pp2_tables2"])
def test_pipeline_offload_is_bit_identical_to_device(world, tables, tmp_path):
    layout = dict(
        pipeline_parallel_degree=2,
        data_parallel_replicate_degree=world // 2,
        data_parallel_shard_degree=1,
        engram_shard_degree=tables,
        pipeline_schedule="1f1b",
    )
    args = model_args(True, "mla", 98, layers=4)
    steps = 5
    # sharded: every microbatch of every step but the first is prefetched (the Engram layer
    # is on the first stage; 2 microbatches per step)
    routed = (steps - 1) * 2 if tables > 1 else None
    offloads = [dict(placement="disk", prefetch=True)]
    if tables == 1:
        offloads.append(dict(placement="host", prefetch=False))
    _check(world, layout, args, tmp_path, steps, offloads, routed)
