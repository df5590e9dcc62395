"""The data loader: loader workers run ``PackedShardStream`` roles (one folder of shards) or
``MixtureStream`` roles (``data.mixture``); the main process tracks exact state.

Worker ``i`` plays role ``(i + role_offset) % num_roles``. The torch DataLoader takes batches from
its workers round-robin, so after ``k`` batches the next one belongs to role ``k % num_roles``; on
resume the offset is set so that the same role comes next. Each batch carries its role's state after
it, so the main process records the state of what it has *consumed* (not what workers prefetched).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import Batch
from data.dataset import PackedShardStream, RoleState
from data.mixture_stream import MixtureStream
from data.shards import load_index

log = logging.getLogger(__name__)


class _RoleDataset(IterableDataset):
    def __init__(self, stream_kwargs: dict, num_roles: int):
        self.stream_kwargs, self.num_roles = stream_kwargs, num_roles
        self.mixture = "specs" in stream_kwargs
        self.role_offset = 0
        self.role_states: dict[int, dict] = {}
        self.shared_state: dict = {}  # mixtures: the global schedule at the last consumed batch

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        role = (worker + self.role_offset) % self.num_roles
        saved = self.role_states.get(role)
        if self.mixture:
            stream = MixtureStream(**self.stream_kwargs, role=role, num_roles=self.num_roles)
            for batch, state in stream.batches({**(saved or {}), **self.shared_state}):
                yield batch.to_torch(), role, state
            return
        stream = PackedShardStream(**self.stream_kwargs, role=role, num_roles=self.num_roles)
        for batch, state in stream.batches(RoleState(**saved) if saved else None):
            yield batch.to_torch(), role, asdict(state)


class StatefulLoader:
    """Iterable of batches with ``state_dict()`` / ``load_state_dict()`` and data-wait timing.

    Args:
        stream_kwargs: ``PackedShardStream`` arguments (without role / num_roles), or
            ``MixtureStream`` arguments (they hold ``specs``).
        num_workers: loader processes; 0 runs the single role in the main process.
        pin_memory: page-locked batches (CUDA), so the copy to the device does not block.
    """

    def __init__(
        self,
        stream_kwargs: dict,
        num_workers: int = 1,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
    ):
        if "specs" not in stream_kwargs and not stream_kwargs.get("url_prefix"):
            load_index(stream_kwargs["folder"], stream_kwargs["split"])  # fail here, not later
        self.num_workers = num_workers
        self.num_roles = max(1, num_workers)
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory  # CUDA: page-locked batches, copied without blocking
        self.dataset = _RoleDataset(stream_kwargs, self.num_roles)
        self.consumed = 0
        self.role_states: dict[int, dict] = {}
        self.last_state: dict = {}  # the state after the last consumed batch (its role's)
        self.wait_seconds = 0.0
        self._iter = None
        self._ahead = None  # a batch taken by ``upcoming()``, not consumed yet

    def _make_iter(self):
        self.dataset.role_offset = self.consumed % self.num_roles
        self.dataset.role_states = dict(self.role_states)
        self.dataset.shared_state = self._shared()
        kwargs = dict(batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        if self.num_workers > 0:
            kwargs.update(prefetch_factor=self.prefetch_factor, persistent_workers=False)
        return iter(DataLoader(self.dataset, **kwargs))

    def __iter__(self):
        return self

    def _take(self):
        if self._ahead is not None:
            item, self._ahead = self._ahead, None
            return item
        if self._iter is None:
            self._iter = self._make_iter()
        started = time.perf_counter()
        item = next(self._iter)
        self.wait_seconds += time.perf_counter() - started
        return item

    def __next__(self) -> Batch:
        batch, role, state = self._take()
        if not self.dataset.mixture:  # a mixture's state is global (``shared``), not per role
            self.role_states[int(role)] = state
        self.last_state = state
        self.consumed += 1
        return batch

    def upcoming(self) -> Batch:
        """The batch the next ``next()`` returns, without consuming it: the state (and so a
        checkpoint) still ends at the last consumed batch. Engram prefetch reads its lookups."""
        if self._ahead is None:
            self._ahead = self._take()
        return self._ahead[0]

    def state_dict(self) -> dict:
        return {
            "consumed": self.consumed,
            "num_roles": self.num_roles,
            "role_states": {str(k): v for k, v in self.role_states.items()},
            "shared": self._shared(),
            "mixture": self._mixture_identity(),
        }

    def _shared(self) -> dict:
        """A mixture's global schedule after the last consumed batch (every role starts there)."""
        return {k: self.last_state[k] for k in ("schedule", "batch") if k in self.last_state}

    def _mixture_identity(self) -> dict | None:
        if not self.dataset.mixture:
            return None
        from data.mixture import identity

        specs = self.dataset.stream_kwargs["specs"]
        return {"sources": identity(specs), "weights": [s.weight for s in specs]}

    def load_state_dict(self, state: dict) -> None:
        if self.dataset.mixture:
            self._load_mixture_state(state)
            return
        if int(state["num_roles"]) != self.num_roles:
            raise ValueError(
                f"the checkpoint's data loader ran {state['num_roles']} worker roles but "
                f"data.num_workers gives {self.num_roles}; resume with "
                f"data.num_workers={state['num_roles']} (or 0 if it was 1)"
            )
        self.consumed = int(state["consumed"])
        self.role_states = {int(k): v for k, v in state["role_states"].items()}
        self._iter, self._ahead = None, None

    def _load_mixture_state(self, state: dict) -> None:
        """A mixture's state is its global schedule: it resumes at any worker count and DP
        degree."""
        from data.mixture import check_resumable

        check_resumable(self.dataset.stream_kwargs["specs"], state.get("mixture"))
        if any(r.get("streams") for r in state.get("role_states", {}).values()):
            log.warning(
                "the checkpoint read its text/shards sources in per-worker streams (before the "
                "document index): they continue in the global order from here, so documents of "
                "the current epoch may repeat or be left out once"
            )
        self.consumed = int(state["consumed"])
        self.role_states = {}
        self.last_state = dict(state.get("shared") or {})
        self._iter, self._ahead = None, None

    def close(self) -> None:
        self._iter, self._ahead = None, None
