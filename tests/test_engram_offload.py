"""Offloaded Engram tables (``host`` and ``disk`` placements) against the in-memory table.

Parity is bit-identical: the same losses, gradient norms and final table rows and moments over
20 steps, with and without prefetch, with a cache smaller than the table (evictions and write
backs happen), with gradient accumulation, and across a checkpoint (streamed DCP save and load,
device <-> disk conversion).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from data.batch import Batch, EngramInputs, plan_lookups
from models.tables.offload import OffloadedEngramTable, OffloadedTables, place_engram_tables
from models.tables.tier import RowCache, RowStore, parse_cache_size, record_layout
from models.transformer import Transformer
from parallel.plan import ParallelPlan
from pretrain.config import OptimizerConfig
from pretrain.optimizer import Optimizers
from pretrain.step import StepModel, forward_backward, lookup_planners, optimizer_step
from tests.test_models import tiny

STEPS, ROWS, SEQ = 20, 4, 16


def args():
    a = tiny("mla", hc=2)
    # a larger table than the tiny default, so that a 30% cache must evict
    a.engram.hash.engram_vocab_size = [401, 409]
    return a


def make_batch(step: int) -> Batch:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, 97, (ROWS, SEQ + 1), generator=g)
    positions = torch.arange(SEQ).expand(ROWS, SEQ).clone()
    hash_ids = torch.randint(0, 397, (ROWS, SEQ, 4), generator=g)
    return Batch(
        tokens[:, :-1],
        tokens[:, 1:],
        positions,
        torch.zeros_like(positions),
        {0: EngramInputs(hash_ids)},
    )


def build(placement: str, tmp_path, cache: str = "30%", state: str = "adam", device="cpu"):
    with torch.device("meta"):
        model = Transformer(args())
    folder = tmp_path / f"tables-{placement}"
    place_engram_tables(model, placement, cache, device, folder, engram_state=state)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    sm = StepModel(model, model, ParallelPlan())
    cfg = OptimizerConfig(lr=1e-2, engram_lr_multiplier=5.0, engram_state=state)
    return sm, Optimizers(model, cfg)


def table_state(sm) -> dict[str, torch.Tensor]:
    """The table rows and moments, wherever they live."""
    table = sm.inner.engram_layers()[0].table
    if isinstance(table, OffloadedEngramTable):
        table.cache.flush()
        return {name: table.store.field(name).clone() for name in table.store.layout}
    return None


def run(
    sm, opts, steps: range, prefetch: bool, accum: int = 1, device=None
) -> list[tuple[float, float]]:
    planners = lookup_planners(sm.inner)
    tables = OffloadedTables(sm.inner)
    out = []
    per = ROWS // accum
    batches = [
        plan_lookups(make_batch(s).select_rows(slice(m * per, (m + 1) * per)), planners)
        for s in steps
        for m in range(accum)
    ]
    for i, batch in enumerate(batches):
        if prefetch and i + 1 < len(batches):
            tables.prefetch(batches[i + 1])
        if device is not None:
            batch = batch.to(torch.device(device))
        micro = forward_backward(sm, batch, scale=1 / accum, sync=(i + 1) % accum == 0)
        if (i + 1) % accum == 0:
            norm = optimizer_step(sm, opts, max_norm=0.5)
            out.append((micro.ce.item(), norm.item()))
    return out


def device_reference(accum: int = 1, state: str = "adam"):
    sm, opts = build("device", Path("/nonexistent"), state=state)
    trace = run(sm, opts, range(STEPS), prefetch=False, accum=accum)
    table = sm.inner.engram_layers()[0].table
    rowwise = opts.optimizers[1]
    moments = {k: rowwise.state[table.weight][k].clone() for k in rowwise.state_names}
    return trace, {"weight": table.weight.detach().clone(), **moments}, sm, opts


@pytest.mark.parametrize("placement", ["host", "disk"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_offloaded_table_is_bit_identical_to_device(tmp_path, placement, prefetch):
    want_trace, want_table, want_sm, want_opts = device_reference()
    sm, opts = build(placement, tmp_path)
    got_trace = run(sm, opts, range(STEPS), prefetch)
    assert got_trace == want_trace  # losses and gradient norms, every step, bit for bit
    got_table = table_state(sm)
    for name, value in want_table.items():
        assert torch.equal(got_table[name], value), name
    dense = {k: v for k, v in want_sm.inner.state_dict().items() if "table" not in k}
    for name, value in sm.inner.state_dict().items():
        if name in dense:
            assert torch.equal(value, dense[name]), name
    stats = OffloadedTables(sm.inner).take_stats()
    assert 0 < stats.hits < stats.lookups and stats.bytes_written > 0  # the cache evicted
    touched, rows = opts.optimizers[1].rows_touched(block_rows=100)  # read from the store
    assert (touched, rows) == want_opts.optimizers[1].rows_touched() and 0 < touched < rows


@pytest.mark.parametrize("state", ["adam_row_v", "adagrad_row"])
def test_lighter_optimizer_state_is_bit_identical_to_device(tmp_path, state):
    """One second moment per row (Adam) or row-wise Adagrad: records of 2 x Dh + 1 or Dh + 1
    floats, trained exactly as the in-memory table with the same state."""
    want_trace, want_table, *_ = device_reference(state=state)
    sm, opts = build("disk", tmp_path, state=state)
    assert run(sm, opts, range(STEPS), prefetch=True) == want_trace
    got = table_state(sm)
    assert got.keys() == want_table.keys()
    assert all(torch.equal(got[k], v) for k, v in want_table.items())
    head_dim = want_table["weight"].shape[1]
    width = {"adam_row_v": 2 * head_dim + 1, "adagrad_row": head_dim + 1}[state]
    assert sm.inner.engram_layers()[0].table.store.width == width


def test_offloaded_table_with_accumulation(tmp_path):
    want_trace, want_table, *_ = device_reference(accum=2)
    sm, opts = build("disk", tmp_path)
    assert run(sm, opts, range(STEPS), prefetch=True, accum=2) == want_trace
    got = table_state(sm)
    assert all(torch.equal(got[k], v) for k, v in want_table.items())


def test_cache_too_small_names_the_fix(tmp_path):
    sm, opts = build("host", tmp_path, cache="40")
    with pytest.raises(ValueError, match="engram_table.cache_size.*raise it to at least"):
        run(sm, opts, range(1), prefetch=False)


def test_cache_size_forms():
    assert parse_cache_size("10%", 1000, 96) == 100
    assert parse_cache_size("1234", 10**6, 96) == 1234
    assert parse_cache_size("96KiB", 10**6, 96) == 1024
    with pytest.raises(ValueError, match="cache_size"):
        parse_cache_size("ten rows", 1000, 96)


def test_disk_store_refuses_another_configuration_and_short_files(tmp_path):
    folder = tmp_path / "t"
    RowStore(100, record_layout("adam", 4), "disk", folder, {"hash_sha256": "a"})
    with pytest.raises(ValueError, match="another configuration.*hash_sha256"):
        RowStore(100, record_layout("adam", 4), "disk", folder, {"hash_sha256": "b"})
    os.truncate(folder / "records.f32", 100)
    with pytest.raises(ValueError, match="needs 4800 bytes.*delete"):
        RowStore(100, record_layout("adam", 4), "disk", folder, {"hash_sha256": "a"})
    assert json.loads((folder / "meta.json").read_text())["num_rows"] == 100


def test_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    def full(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="cannot reserve .* GiB.*free space"):
        RowStore(1000, record_layout("adam", 4), "disk", tmp_path / "t", {})
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == []


def test_cache_pins_rows_until_the_optimizer_step():
    store = RowStore(50, record_layout("adam", 1), "host")
    store.records.copy_(torch.arange(150.0).reshape(50, 3))
    cache = RowCache(store, 6, "cpu")
    cache.acquire(np.array([1, 2, 3]))
    cache.prefetch(np.array([4, 5, 6]))
    cache.acquire(np.array([4, 5, 6]))
    with pytest.raises(ValueError, match="6 rows are in use"):
        cache.acquire(np.array([7]))  # nothing may be evicted before the step
    cache.records[:, 0] += 1000  # "the update"
    cache.step_done()
    staged = cache.acquire(np.array([7, 8]))  # evicts the two oldest, written back
    assert torch.equal(staged, store.records[[7, 8]])
    assert store.records[1, 0] == 1003 and store.records[2, 0] == 1006


def _table_keys(folder) -> dict:
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {k: len(v.chunks) for k, v in meta.items() if k.endswith("table.weight")}


@pytest.mark.parametrize(
    "source,target,state",
    [
        ("disk", "disk", "adam"),
        ("device", "disk", "adam"),
        ("disk", "device", "adam"),
        ("disk", "device", "adam_row_v"),
    ],
)
def test_checkpoint_resume_and_placement_conversion_are_bit_identical(
    tmp_path, source, target, state
):
    """10 steps in ``source``, a DCP checkpoint (tables in row blocks), 10 more in ``target``:
    the same as 20 uninterrupted steps on the device."""
    from pretrain.checkpoint import CheckpointManager, TableStateMismatch

    want_trace, want_table, *_ = device_reference(state=state)
    sm, opts = build(source, tmp_path, state=state)
    first = run(sm, opts, range(10), prefetch=True)
    identity = {"tokenizer_identity": "t", "engram_hash": None}
    manager = CheckpointManager(tmp_path / "ckpt", 2, identity)
    monkey = pytest.MonkeyPatch()
    monkey.setattr("parallel.sharding.TABLE_BLOCK_ROWS", 256)  # several blocks per table
    try:
        path = manager.save(10, sm.model, opts, {})
        blocks = -(-sm.inner.engram_layers()[0].table.num_rows // 256)
        assert _table_keys(path) == {"model.layers.0.engram.table.weight": blocks} and blocks > 2
        other = "adagrad_row" if state == "adam" else "adam"
        with pytest.raises(
            TableStateMismatch, match=f"resume with optimizer.engram_state='{state}'"
        ):
            other_sm, other_opts = build(target, tmp_path / "other", state=other)
            manager.load_latest(other_sm.model, other_opts)
        resumed, opts2 = build(target, tmp_path / "resumed", state=state)
        torch.manual_seed(123)  # the load must restore everything that matters
        state = manager.load_latest(resumed.model, opts2)
    finally:
        monkey.undo()
    assert state["step"] == 10
    second = run(resumed, opts2, range(10, 20), prefetch=True)
    assert first + second == want_trace
    got = table_state(resumed)
    if got is None:  # the device
        table = resumed.inner.engram_layers()[0].table
        adam = opts2.optimizers[1].state[table.weight]
        got = {"weight": table.weight, **{k: adam[k] for k in opts2.optimizers[1].state_names}}
    assert all(torch.equal(got[k], v) for k, v in want_table.items())


def test_hit_rate_counts_each_batch_once():
    store = RowStore(50, record_layout("adam", 1), "host")
    cache = RowCache(store, 10, "cpu")
    cache.acquire(np.array([1, 2]))
    cache.prefetch(np.array([2, 3, 4]))  # one hit, two misses
    cache.acquire(np.array([2, 3, 4]))  # joins the prefetch: counted there only
    stats = cache.stats.take()
    assert (stats.lookups, stats.hits) == (5, 1)
    assert stats.bytes_read == 4 * 3 * 4


def test_host_shard_plan_keeps_its_ids_on_the_host():
    """An offloaded shard's plan moves only ``inverse`` to the device (the owners' tiers read the
    ids on the host) and keeps its class through ``to_torch`` and the pipeline's pytree split."""
    from torch.utils import _pytree as pytree

    from models.tables.offload import HostShardPlan, HostShardPlanner

    ids = np.random.default_rng(0).integers(0, 10, (4, 3, 2))
    plan = HostShardPlanner(np.array([0, 10]), [0, 10, 20])(ids, num_chunks=2).to_torch()
    moved = plan.to("meta")
    assert isinstance(moved, HostShardPlan)
    assert moved.unique_ids.device.type == "cpu" and moved.inverse.device.type == "meta"
    leaves, spec = pytree.tree_flatten(moved)
    assert isinstance(pytree.tree_unflatten(leaves, spec), HostShardPlan)
    assert moved.send_counts.sum(dim=1).tolist() == [
        len(np.unique(ids[:2] + [0, 10])),
        len(np.unique(ids[2:] + [0, 10])),
    ]


def test_disk_store_scattered_reads_and_writes_in_parallel(tmp_path):
    """Accesses of at least IO_SPLIT_ROWS rows run over IO_THREADS row ranges (page faults in
    flight together); the records land and read back exactly, the untouched ones stay zero."""
    from models.tables import tier as row_tier

    store = RowStore(20_000, record_layout("adam", 2), "disk", tmp_path / "t", {})
    rows = np.sort(np.random.default_rng(0).choice(20_000, 5_000, replace=False))
    assert len(rows) >= row_tier.IO_SPLIT_ROWS
    values = torch.randn(len(rows), store.width)
    store.write(rows, values)
    assert torch.equal(store.read(rows), values)
    untouched = np.setdiff1d(np.arange(20_000), rows)
    assert store.read(untouched).abs().sum() == 0
    store.sync()
    again = RowStore(20_000, record_layout("adam", 2), "disk", tmp_path / "t", {})
    assert torch.equal(again.read(rows[::7]), values[::7])


def test_write_behind_lands_before_a_read_of_the_same_rows(tmp_path, monkeypatch):
    """An evicted row's write-back runs in the background; a read of that row waits for it, so a
    row evicted and loaded again is never stale."""
    import threading

    store = RowStore(100, record_layout("adam", 1), "disk", tmp_path / "t", {})
    gate = threading.Event()
    write = store.write

    def slow_write(rows, records):
        gate.wait(5)
        write(rows, records)

    monkeypatch.setattr(store, "write", slow_write)
    store.write_behind(np.array([3, 7]), torch.full((2, 3), 5.0))
    threading.Timer(0.2, gate.set).start()
    assert torch.equal(store.read(np.array([7])), torch.full((1, 3), 5.0))  # waited
    store.write_behind(np.array([9]), torch.full((1, 3), 2.0))
    store.sync()  # lands everything
    assert store.records[9, 0] == 2.0


@pytest.mark.slow
def test_fused_row_update_of_an_offloaded_table_follows_the_in_memory_one(tmp_path):
    """The compiled row update (CUDA's default) over cache records trains a host table
    bit-identically to the compiled update over an in-memory table's rows and state, and after
    one step within float32 rounding of the eager update of an in-memory table (later steps
    amplify the rounding through Adam's normalisation of tiny moments)."""
    eager_sm, eager_opts = build("device", Path("/nonexistent"))
    fused_sm, fused_opts = build("host", tmp_path / "one")
    fused_opts.optimizers[1].fused = True
    eager = run(eager_sm, eager_opts, range(1), prefetch=False)
    (fused,) = run(fused_sm, fused_opts, range(1), prefetch=False)
    assert fused == pytest.approx(eager[0], rel=1e-6)
    table = eager_sm.inner.engram_layers()[0].table
    rowwise = eager_opts.optimizers[1]
    eager_state = {"weight": table.weight.detach(), **rowwise.state[table.weight]}
    for name, value in table_state(fused_sm).items():
        torch.testing.assert_close(value, eager_state[name], rtol=1e-5, atol=1e-7)
    want_sm, want_opts = build("device", Path("/nonexistent"))
    sm, opts = build("host", tmp_path)
    want_opts.optimizers[1].fused = opts.optimizers[1].fused = True
    want = run(want_sm, want_opts, range(STEPS), prefetch=False)
    got = run(sm, opts, range(STEPS), prefetch=True)
    assert got == want
    table = want_sm.inner.engram_layers()[0].table
    rowwise = want_opts.optimizers[1]
    want_state = {"weight": table.weight.detach(), **rowwise.state[table.weight]}
    for name, value in table_state(sm).items():
        assert torch.equal(value, want_state[name]), name
