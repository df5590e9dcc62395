"""Where an offloaded Engram table's rows live: a host or disk store behind a device-side row cache.

Every row is one record ``[w | m | v]``: the table row and its row-wise Adam moments, so the
optimizer's state lives in the same tier as the rows and moves with them, and a disk read of one
row brings its state in the same page.

- ``RowStore``: all records of the table (or of this rank's row shard). ``host``: process memory
  (page-locked on CUDA machines, for asynchronous copies). ``disk``: a file read and written
  through a memory map, so the table may exceed RAM (its pages are page cache, not process
  memory).
- ``RowCache``: ``C`` record slots on the compute device, least-recently-used by batch. It is also
  the staging area: a batch's rows are made resident (``ensure``) before the layer needs them, the
  forward gathers them from their slots, and the optimizer updates them there. Rows used since the
  last optimizer step are pinned (never evicted), so a prefetch for the next batch cannot disturb
  the current one, and a row read at step t+1 always sees step t's update: training is exact.
  Evicted rows are written back to the store when dirty.

Legend: N rows of the store, C cache slots, Dh head dim, W record width (3 * Dh).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.tables.table import host_to_device

log = logging.getLogger(__name__)

# ``optimizer.engram_state`` -> the optimizer state of one table row: field name -> values
# (``"dh"``: one per column; 1: one scalar per row). Float32 per row: adam 3 x Dh (the row, two
# moments), adam_row_v 2 x Dh + 1, adagrad_row Dh + 1.
ENGRAM_STATES = {
    "adam": {"exp_avg": "dh", "exp_avg_sq": "dh"},  # lazy Adam (torch SparseAdam)
    "adam_row_v": {"exp_avg": "dh", "exp_avg_sq": 1},  # Adam, one second moment per row
    "adagrad_row": {"sum_sq": 1},  # row-wise Adagrad: one accumulated square per row
}


def engram_state_fields(state: str) -> dict:
    """``ENGRAM_STATES[state]``, or a clear error naming the choices."""
    if state not in ENGRAM_STATES:
        raise ValueError(f"optimizer.engram_state={state!r}: use one of {', '.join(ENGRAM_STATES)}")
    return ENGRAM_STATES[state]


def record_layout(state: str, head_dim: int) -> dict[str, int]:
    """Field name -> width of one record: the table row, then its optimizer state."""
    fields = engram_state_fields(state).items()
    return {"weight": head_dim, **{k: head_dim if w == "dh" else w for k, w in fields}}


IO_THREADS = 16  # disk reads and write-backs in flight (page faults of scattered records)
IO_SPLIT_ROWS = 2048  # fewer rows than this are read by one thread
_SIZE = re.compile(r"^\s*([0-9.]+)\s*(%|[KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_cache_size(spec: str | int, num_rows: int, row_bytes: int) -> int:
    """Cache slots from ``engram_table.cache_size``: rows (``"100000"``), a share of the table's
    rows (``"10%"``) or bytes of records (``"2GiB"``, ``"500MB"``)."""
    match = _SIZE.match(str(spec))
    if not match:
        raise ValueError(
            f"engram_table.cache_size={spec!r}: give rows ('100000'), a share of the rows "
            "('10%') or bytes ('2GiB')"
        )
    value, unit = float(match.group(1)), (match.group(2) or "").lower()
    if unit == "%":
        rows = num_rows * value / 100
    elif unit:
        rows = value * _UNITS[unit] / row_bytes
    else:
        rows = value
    return max(1, min(num_rows, int(rows)))


def split_records(records: torch.Tensor, layout: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """Views of the fields of records ``[n, W]`` (``record_layout`` order; no copy)."""
    return records.split(list(layout.values()), dim=1)


class RowStore:
    """All ``[N, W]`` float32 records of one table (shard), in host memory or in a file.

    Args:
        num_rows: N.
        layout: the record's fields and their widths (``record_layout``; W is their sum).
        placement: "host" or "disk".
        folder: disk: the folder of this table's files.
        identity: what the records belong to (table sizes, head dim, hash configuration);
            written beside a disk file and checked when the folder is reused.
        pin: page-locked host memory (CUDA machines).
    """

    def __init__(self, num_rows, layout, placement, folder=None, identity=None, pin=False):
        width = sum(layout.values())
        self.num_rows, self.layout, self.width, self.placement = num_rows, layout, width, placement
        self.identity = dict(identity or {}, num_rows=num_rows, width=width, dtype="float32")
        if placement == "host":
            records = torch.zeros(num_rows, width)
            self.records = records.pin_memory() if pin else records
            self.path, self.fresh = None, True
        elif placement == "disk":
            self.path = Path(folder) / "records.f32"
            self.fresh = not (Path(folder) / "meta.json").is_file()  # a new file reads as zeros
            self._mmap = _open_records(Path(folder), self.path, num_rows, width, self.identity)
            self._map = np.frombuffer(self._mmap, dtype=np.float32).reshape(num_rows, width)
            self.records = torch.from_numpy(self._map)
            self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="engram-io")
            self._advice_lock, self._scattering = threading.Lock(), 0
        else:
            raise ValueError(f"engram_table.placement={placement!r}: use device, host or disk")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="engram-write-behind")
        self._pending: list[tuple[np.ndarray, Future]] = []  # writes not yet landed

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """Records of ``rows`` (host tensor ``[n, W]``); waits for pending writes of them."""
        self._land(rows)
        if self.path is None:
            return self.records.index_select(0, torch.from_numpy(rows))
        out = np.empty((len(rows), self.width), dtype=np.float32)

        def gather(part: slice) -> None:
            out[part] = self._map[rows[part]]

        self._scattered(gather, len(rows))
        return torch.from_numpy(out)

    def write(self, rows: np.ndarray, records: torch.Tensor) -> None:
        if self.path is None:
            self.records.index_copy_(0, torch.from_numpy(rows), records)
            return
        values = records.numpy()

        def scatter(part: slice) -> None:
            self._map[rows[part]] = values[part]

        self._scattered(scatter, len(rows))

    def write_behind(self, rows: np.ndarray, records: torch.Tensor, ready=None) -> None:
        """``write`` in the background (disk, or records still arriving from the device): an
        eviction does not wait for the disk or the copy. ``ready``: a CUDA event that the
        device-to-host copy into ``records`` (page-locked) has completed. A later ``read`` of
        these rows, ``drain`` and ``sync`` wait for the write."""
        if self.path is None and ready is None:
            self.write(rows, records)
            return

        def land() -> None:
            if ready is not None:
                ready.synchronize()  # this thread waits for the copy, not the training loop
            self.write(rows, records)

        self._pending = [(r, f) for r, f in self._pending if not f.done()]
        self._pending.append((rows, self._writer.submit(land)))

    def _land(self, rows: np.ndarray | None = None) -> None:
        """Wait for the pending writes (of ``rows`` only, when given) and re-raise a failure."""
        for written, future in self._pending:
            if rows is None or np.isin(rows, written, assume_unique=True).any():
                future.result()
        self._pending = [(r, f) for r, f in self._pending if not f.done()]

    def drain(self) -> None:
        """Wait for every pending write (before the store is read or replaced in bulk)."""
        self._land()

    def _scattered(self, fn, count: int) -> None:
        """Run ``fn(part)`` over row ranges of a scattered disk access: page faults without
        read-around (a fault would otherwise read 128 KiB around each 384-byte record) and
        ``IO_THREADS`` of them in flight, since one thread waits for one page at a time
        (together about 20x faster on a cold file here; docs/benchmarks.md). Bulk sequential
        passes (initialisation, checkpoints) keep the kernel's read-ahead."""
        self._advise(+1)
        try:
            if count < IO_SPLIT_ROWS:
                fn(slice(0, count))
                return
            edges = np.linspace(0, count, IO_THREADS + 1).astype(int)
            parts = [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
            for done in [self._io.submit(fn, part) for part in parts]:
                done.result()
        finally:
            self._advise(-1)

    def _advise(self, change: int) -> None:
        """No read-around while any scattered access runs (reads and write-behind overlap)."""
        with self._advice_lock:
            self._scattering += change
            if self._scattering == (1 if change > 0 else 0):
                self._mmap.madvise(mmap.MADV_RANDOM if change > 0 else mmap.MADV_NORMAL)

    def field(self, name: str) -> torch.Tensor:
        """A ``[N, width]`` view of one record field (no copy)."""
        return split_records(self.records, self.layout)[list(self.layout).index(name)]

    def sync(self) -> None:
        """Land every pending write, and make a disk store durable (before a checkpoint is
        declared complete)."""
        self._land()
        if self.path is not None:
            self._mmap.flush()


def _open_records(folder: Path, path: Path, num_rows: int, width: int, identity: dict):
    """The record file of ``folder``, created (space reserved, so a full disk fails now and not
    mid-training) or reused when it belongs to the same table; a clear error otherwise."""
    meta_path = folder / "meta.json"
    size = num_rows * width * 4
    if meta_path.is_file():
        saved = json.loads(meta_path.read_text())
        differs = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        if differs:
            raise ValueError(
                f"{folder} holds an Engram table of another configuration (differs in: "
                f"{', '.join(differs)}); point engram_table.path at another folder or delete it"
            )
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            raise ValueError(
                f"{path} is {'missing' if actual is None else f'{actual} bytes'} but the table "
                f"needs {size} bytes (an interrupted job?); delete {folder} to start it afresh"
            )
        return _map_file(path, size)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as handle:
            _reserve(handle.fileno(), size, folder)
        os.replace(tmp, path)
        meta_tmp = meta_path.with_suffix(".tmp")
        meta_tmp.write_text(json.dumps(identity, sort_keys=True))
        os.replace(meta_tmp, meta_path)  # written last: a folder without it is not a table
    except BaseException:
        tmp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    log.info("created %s (%.2f GiB of rows and optimizer state)", path, size / 2**30)
    return _map_file(path, size)


def _map_file(path: Path, size: int) -> mmap.mmap:
    with open(path, "r+b") as handle:
        return mmap.mmap(handle.fileno(), size)  # the mapping keeps the file open


def _reserve(fd: int, size: int, folder: Path) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        free = shutil.disk_usage(folder).free
        raise OSError(
            err.errno,
            f"cannot reserve {size / 2**30:.2f} GiB for an Engram table in {folder} "
            f"({free / 2**30:.2f} GiB free): free space or set engram_table.path to a larger "
            "disk",
        ) from err


@dataclass
class TierStats:
    """Counters since the last ``take()``."""

    lookups: int = 0  # unique rows asked for
    hits: int = 0  # of them already resident
    bytes_read: int = 0  # store -> cache
    bytes_written: int = 0  # cache -> store (dirty evictions and flushes)
    wait_seconds: float = 0.0  # the step blocked on rows not yet resident

    def take(self) -> TierStats:
        taken = TierStats(**vars(self))
        self.__init__()
        return taken


class RowCache:
    """``C`` device slots of records in front of a ``RowStore``, least-recently-used by batch.

    Args:
        store: the records' home.
        num_slots: C (at least the unique rows of the microbatches between two optimizer steps
            plus one prefetched microbatch).
        device: where the slots live (the compute device).
    """

    def __init__(self, store: RowStore, num_slots: int, device):
        self.store, self.device = store, torch.device(device)
        self.num_slots = num_slots
        self.records = torch.zeros(num_slots, store.width, device=self.device)
        self.row_slot = np.full(
            store.num_rows, -1, dtype=np.int32 if num_slots < 2**31 else np.int64
        )
        self.slot_row = np.full(num_slots, -1, dtype=np.int64)
        self.stamp = np.zeros(num_slots, dtype=np.int64)
        self.dirty = np.zeros(num_slots, dtype=bool)
        self.tick, self.window_start = 0, 1  # rows stamped >= window_start are pinned
        self._train_tick = 0  # the tick of the last training acquire
        self.stats = TierStats()
        self._pending: dict[int, threading.Thread] = {}
        self._failure: BaseException | None = None
        self._lock = threading.Lock()  # one ensure at a time
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None

    # ----- residency -----
    def ensure(self, rows: np.ndarray, count: bool = True) -> None:
        """Make ``rows`` (sorted, unique) resident and pin them until the next ``step_done``.
        ``count``: add the request to the hit statistics (once per batch: its prefetch, or its
        acquire when it was not prefetched)."""
        with self._lock:
            self.tick += 1
            slots = self.row_slot[rows]
            self.stamp[slots[slots >= 0]] = self.tick  # pinned first: never their own victims
            missing = rows[slots < 0]
            if count:
                self.stats.lookups += len(rows)
                self.stats.hits += len(rows) - len(missing)
            if len(missing):
                self._load(missing, self._free_slots(len(missing), len(rows)))
                self.stamp[self.row_slot[missing]] = self.tick

    def _free_slots(self, count: int, requested: int) -> np.ndarray:
        free = np.flatnonzero(self.slot_row < 0)[:count]
        if len(free) == count:
            return free
        evictable = np.flatnonzero((self.slot_row >= 0) & (self.stamp < self.window_start))
        need = count - len(free)
        if len(evictable) < need:
            pinned = int(((self.slot_row >= 0) & (self.stamp >= self.window_start)).sum())
            raise ValueError(
                f"engram_table.cache_size gives {self.num_slots} rows, but {pinned} rows are in "
                f"use since the last optimizer step and a batch asks for {requested} more: the "
                "cache must hold the unique rows of every microbatch of a step plus one "
                f"prefetched microbatch; raise it to at least {pinned + requested} rows"
            )
        oldest = evictable[np.argpartition(self.stamp[evictable], need - 1)[:need]]
        self._evict(oldest)
        return np.concatenate([free, oldest])

    def _evict(self, slots: np.ndarray) -> None:
        dirty = slots[self.dirty[slots]]
        if len(dirty):
            self._write_back(dirty)
        self.row_slot[self.slot_row[slots]] = -1
        self.slot_row[slots] = -1

    def upload(self, values: np.ndarray) -> torch.Tensor:
        """Host ``values`` (slot or row indices) on the device. CUDA: from page-locked memory
        on the copy stream, which the compute stream then waits for (an event, not the host)."""
        if self._copy_stream is None:
            return host_to_device(values, self.device)
        with torch.cuda.stream(self._copy_stream):
            out = host_to_device(values, self.device)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self._copy_stream)
        out.record_stream(compute)
        return out

    def _write_back(self, slots: np.ndarray) -> None:
        records = self.records.index_select(0, self.upload(slots))
        rows = self.slot_row[slots].copy()
        if self._copy_stream is None:
            self.store.write_behind(rows, records)
        else:  # device -> page-locked host on the copy stream; the store's writer waits for it
            host = torch.empty(records.shape, dtype=records.dtype, pin_memory=True)
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                host.copy_(records, non_blocking=True)
                records.record_stream(self._copy_stream)
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
            self.store.write_behind(rows, host, ready)
        self.dirty[slots] = False
        self.stats.bytes_written += records.numel() * 4

    def _load(self, rows: np.ndarray, slots: np.ndarray) -> None:
        records = self.store.read(rows)
        self.stats.bytes_read += records.numel() * 4
        index = torch.from_numpy(slots)
        if self._copy_stream is not None:  # host -> device on a side stream, then joined
            # after the write-back reads of the victims' slots on the compute stream
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                self.records.index_copy_(
                    0,
                    index.pin_memory().to(self.device, non_blocking=True),
                    records.pin_memory().to(self.device, non_blocking=True),
                )
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        else:
            self.records.index_copy_(0, index, records)
        self.slot_row[slots] = rows
        self.row_slot[rows] = slots

    # ----- prefetch -----
    def prefetch(self, rows: np.ndarray) -> None:
        """Start making ``rows`` resident in a background thread (``acquire`` joins it)."""
        key = rows_key(rows)
        if key in self._pending:
            return
        thread = threading.Thread(target=self._prefetch, args=(rows,), daemon=True)
        self._pending[key] = thread
        thread.start()

    def _prefetch(self, rows: np.ndarray) -> None:
        try:
            self.ensure(rows)
        except BaseException as err:  # noqa: BLE001 - re-raised in the training thread
            self._failure = err

    def acquire(
        self, rows: np.ndarray, train: bool = True, width: int | None = None
    ) -> torch.Tensor:
        """The records ``[U, W]`` of ``rows`` for one microbatch (joins its prefetch, or loads
        them now); ``width``: only their first ``width`` values (the rows without their state).
        ``train``: the rows stay pinned and are marked for the next optimizer step; otherwise
        (evaluation) they may be evicted right after, unless a step is pending."""
        started = time.perf_counter()
        thread = self._pending.pop(rows_key(rows), None)
        if thread is not None:
            thread.join()
        if self._failure is not None:
            err, self._failure = self._failure, None
            raise err
        self.ensure(rows, count=thread is None)  # after a prefetch: hits, stamped in use
        self.stats.wait_seconds += time.perf_counter() - started
        slots = self.row_slot[rows].astype(np.int64)
        source = self.records if width is None else self.records[:, :width]
        staged = source.index_select(0, self.upload(slots))
        if train:
            self.dirty[slots] = True  # the optimizer step will update them
            self._train_tick = self.tick
        elif self._train_tick < self.window_start:  # nothing awaits an update: unpin
            self.window_start = self.tick + 1
        return staged

    def hold_for_update(self, rows: np.ndarray) -> None:
        """Make ``rows`` (sorted, unique) resident and pinned for this step's update without a
        lookup: rows that other replica groups looked up, whose averaged gradient this group
        applies as well."""
        self.ensure(rows, count=False)
        self.dirty[self.row_slot[rows]] = True
        self._train_tick = self.tick

    def slots(self, rows: np.ndarray) -> np.ndarray:
        """Slots of resident ``rows`` (the optimizer's rows, pinned since their ``acquire``)."""
        slots = self.row_slot[rows].astype(np.int64)
        if (slots < 0).any():
            raise RuntimeError("an Engram row to update is not resident: acquire() it first")
        return slots

    def step_done(self) -> None:
        """After the optimizer step: rows of this step may be evicted again (prefetched ones
        that no microbatch has used yet stay pinned)."""
        self.window_start = self._train_tick + 1

    def wait(self) -> None:
        for thread in self._pending.values():
            thread.join()
        self._pending.clear()
        if self._failure is not None:
            err, self._failure = self._failure, None
            raise err

    # ----- checkpoints -----
    def flush(self) -> None:
        """Write every dirty slot back to the store (the store is then complete)."""
        self.wait()
        with self._lock:
            dirty = np.flatnonzero(self.dirty & (self.slot_row >= 0))
            if len(dirty):
                self._write_back(dirty)
        self.store.sync()

    def invalidate(self) -> None:
        """Forget every slot without writing back (the store was just loaded)."""
        self.wait()
        self.store.drain()
        with self._lock:
            self.row_slot[:] = -1
            self.slot_row[:] = -1
            self.dirty[:] = False
            self.stamp[:] = 0
            self.window_start = self.tick + 1


def rows_key(rows: np.ndarray) -> int:
    return hash(np.ascontiguousarray(rows).tobytes())
