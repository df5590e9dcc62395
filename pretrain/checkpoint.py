"""Atomic, sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout: ``<dump>/<folder>/step-00000100/`` holds the DCP shards of the model and optimizer states,
``train_state_rank{r}.pt`` (RNG states, data-loader state, LR step) for every rank, and
``meta.json`` (step, Engram hash configuration, tokenizer identity), which is written last.
Everything is written to a ``.tmp`` folder first and renamed, so a kill at any moment leaves either
a complete checkpoint or a ``.tmp`` folder that is ignored. The newest complete checkpoint that
loads is resumed; a corrupt one is reported and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from data.ngram_hash import hash_config_mismatches
from parallel.distributed import barrier
from parallel.sharding import TABLE_BLOCK_ROWS, RowBlocks

log = logging.getLogger(__name__)
PREFIX = "step-"
# single-process DCP is intended here; its "assuming a single process" warning is noise
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)


class HashConfigMismatch(ValueError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    import random

    import numpy as np

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints (``meta.json`` and ``.metadata``) in ``folder``."""
    steps = []
    for path in folder.glob(f"{PREFIX}*"):
        if path.suffix == ".tmp" or not path.is_dir():
            continue
        if not (path / "meta.json").is_file() or not (path / ".metadata").is_file():
            log.warning("skipping incomplete checkpoint %s (no meta.json or .metadata)", path)
            continue
        steps.append(int(path.name[len(PREFIX) :]))
    return sorted(steps)


class CheckpointManager:
    """Saves every ``interval`` steps, keeps the last ``keep_last``, resumes the newest complete
    one."""

    def __init__(
        self,
        folder: str | Path,
        keep_last: int,
        identity: dict,
        async_mode: str = "disabled",
        shared: bool = False,
    ):
        """``shared``: replica groups (fault tolerance) share the folder, and one of them may be
        writing a checkpoint now: a starting group leaves ``.tmp`` folders alone (the writer
        removes those older than each checkpoint it completes)."""
        self.folder = Path(folder)
        self.keep_last = keep_last
        # "async": dcp.async_save stages the state in host memory and writes it in a thread while
        # training goes on; the checkpoint is completed (meta.json, rename) by ``finish()``,
        # which the next save and the end of the job call
        self.async_mode = async_mode
        self._pending = None
        self.identity = identity  # {"engram_hash": dict | None, "tokenizer_identity": str}
        if _rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in [] if shared else self.folder.glob(f"{PREFIX}*.tmp"):
                log.warning("removing incomplete checkpoint %s (a save was interrupted)", stale)
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def complete_steps(self) -> list[int]:
        return complete_steps(self.folder)

    def path(self, step: int) -> Path:
        return self.folder / f"{PREFIX}{step:08d}"

    def save(self, step: int, model, optimizers, train_state: dict, blocking=False) -> Path:
        """Write the checkpoint of ``step``; with ``async_mode="async"`` (and not ``blocking``)
        only start it: ``finish()`` completes it."""
        self.finish()
        final = self.path(step)
        tmp = final.with_suffix(".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        torch.save({**train_state, "rng": rng_state()}, tmp / f"train_state_rank{_rank()}.pt")
        asynchronous = self.async_mode == "async" and not blocking
        state = _state(model, optimizers, blocked=not asynchronous)
        if asynchronous:
            self._pending = (dcp.async_save(state, checkpoint_id=str(tmp)), step)
            return final
        dcp.save(state, checkpoint_id=str(tmp))
        self._complete(step)
        return final

    def finish(self) -> None:
        """Wait for an asynchronous save in flight and complete its checkpoint."""
        if self._pending is None:
            return
        future, step = self._pending
        self._pending = None
        result = future.result()
        if hasattr(result, "upload_completion"):  # AsyncSaveResponse (newer DCP)
            result.upload_completion.result()
        self._complete(step)

    def _complete(self, step: int) -> None:
        final = self.path(step)
        tmp = final.with_suffix(".tmp")
        barrier()
        if _rank() == 0:
            meta = {
                "step": step,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                **self.identity,
            }
            with open(tmp / "meta.json", "w") as handle:
                json.dump(meta, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            self._prune()
        barrier()

    def _prune(self) -> None:
        steps = self.complete_steps()
        for step in steps[: -self.keep_last]:
            shutil.rmtree(self.path(step), ignore_errors=True)
        for stale in self.folder.glob(f"{PREFIX}*.tmp"):  # saves older than the newest died
            if int(stale.stem[len(PREFIX) :]) < steps[-1]:
                log.warning("removing incomplete checkpoint %s (a save was interrupted)", stale)
                shutil.rmtree(stale, ignore_errors=True)

    def check_identity(self, path: Path) -> None:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("tokenizer_identity") != self.identity["tokenizer_identity"]:
            raise HashConfigMismatch(
                f"checkpoint {path} was trained with tokenizer {meta.get('tokenizer_identity')} "
                f"but this job uses {self.identity['tokenizer_identity']}; resume with the "
                "original tokenizer or start a new job.dump_folder"
            )
        saved, current = meta.get("engram_hash"), self.identity["engram_hash"]
        if (saved is None) != (current is None) or (
            saved and hash_config_mismatches(saved, current)
        ):
            fields = hash_config_mismatches(saved or {}, current or {})
            raise HashConfigMismatch(
                f"checkpoint {path} was trained with a different Engram hash configuration "
                f"(differs in: {', '.join(fields)}); its tables would be read with the wrong ids. "
                "Resume with the original engram/tokenizer settings or start a new "
                "job.dump_folder"
            )

        saved, current = meta.get("quantize", "none"), self.identity.get("quantize", "none")
        if saved != current:
            log.warning(
                "checkpoint %s was trained with FP8 %s and this job trains with FP8 %s: the "
                "weights are kept in high precision either way and load as they are; expect the "
                "loss to move by the precision's difference at the switch",
                path,
                saved,
                current,
            )

    def _train_state(self, path: Path) -> dict:
        """This rank's RNG and loader state; none when the checkpoint was saved at another world
        size (a resharded resume: the weights and optimizer states carry over, the data order
        starts afresh)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        saved_world = json.loads((path / "meta.json").read_text()).get("world_size", 1)
        if saved_world != world:
            log.warning(
                "checkpoint %s was saved at world size %d, now %d: weights and optimizer "
                "states are resharded; the RNG state starts afresh",
                path,
                saved_world,
                world,
            )
            # a data.mixture's schedule is global: it continues at any layout (rank 0's copy)
            first = torch.load(path / "train_state_rank0.pt", weights_only=False)
            loader = first.get("loader") or {}
            if loader.get("mixture") is None:
                log.warning("the data loader starts afresh (one data folder: per-rank order)")
                return {}
            return {"loader": {**loader, "other_layout": True}}
        return torch.load(path / f"train_state_rank{_rank()}.pt", weights_only=False)

    def load_latest(self, model, optimizers) -> dict | None:
        """Load the newest complete checkpoint; returns its train state, or None when there is
        none."""
        for step in reversed(self.complete_steps()):
            path = self.path(step)
            self.check_identity(path)
            try:
                saved = dcp.FileSystemReader(str(path)).read_metadata()
                _check_table_state(path, saved, optimizers)
                state = _state(model, optimizers, blocked=False, saved=saved)
                dcp.load(state, checkpoint_id=str(path))
                _set_state(model, optimizers, state)
                train_state = self._train_state(path)
            except TableStateMismatch:
                raise  # a configuration error, not a corrupt checkpoint
            except (Exception, CheckpointException) as err:  # noqa: BLE001 - skipped, loudly
                log.warning(
                    "checkpoint %s is corrupt or unreadable (%s: %s); trying an older one",
                    path,
                    type(err).__name__,
                    err,
                )
                continue
            if "rng" in train_state:
                set_rng_state(train_state.pop("rng"))
            log.info("resumed from %s", path)
            return {**train_state, "step": step, "path": str(path)}
        if self.complete_steps():
            # a failed load may have overwritten part of the model: never train on from that state
            raise RuntimeError(
                f"no checkpoint in {self.folder} could be loaded (see the warnings above); "
                "move the folder aside to start fresh, or set checkpoint.load=false"
            )
        return None

    def load_initial(self, path: str | Path, model, optimizers=None) -> Path:
        """Start a new job from the DCP checkpoint ``path`` (a step folder, or a run's checkpoint
        folder: its newest complete step): the model weights, and the optimizer states too when
        ``optimizers`` is given (a continuation job; the checkpoint must hold them). The LR
        schedule, data order and RNG start afresh. The tokenizer and Engram hash configuration
        must be this job's. Returns the step folder loaded."""
        path = Path(path)
        if not (path / ".metadata").is_file() and path.is_dir():  # a run's checkpoint folder
            found = complete_steps(path)
            path = path / f"{PREFIX}{found[-1]:08d}" if found else path
        if not (path / ".metadata").is_file() or not (path / "meta.json").is_file():
            raise FileNotFoundError(
                f"checkpoint.initial_load_path={path} is not a complete DCP checkpoint (needs "
                ".metadata and meta.json) nor a folder of step-* checkpoints"
            )
        self.check_identity(path)
        saved = dcp.FileSystemReader(str(path)).read_metadata()
        opts = optimizers if optimizers is not None else _NoOptimizers()
        if optimizers is not None:
            if not any(k.startswith("optim0.") for k in saved.state_dict_metadata):
                raise ValueError(
                    f"checkpoint.initial_load_model_only=false but {path} holds no optimizer "
                    "state (a converted checkpoint holds weights only): set it to true"
                )
            _check_table_state(path, saved, optimizers)
        state = _state(model, opts, blocked=False, saved=saved)
        dcp.load(state, checkpoint_id=str(path))
        _set_state(model, opts, state)
        what = "weights" if optimizers is None else "weights and optimizer states"
        log.info("initial %s loaded from %s", what, path)
        return path


class _NoOptimizers:
    optimizers: list = []


class TableStateMismatch(ValueError):
    """The checkpoint's tables carry another optimizer state than ``optimizer.engram_state``."""


def _check_table_state(path, saved, optimizers) -> None:
    """Refuse a checkpoint whose tables keep another row-wise optimizer state (names and
    widths: ``adam`` and ``adam_row_v`` share names) with the setting to resume with."""
    from models.tables.tier import ENGRAM_STATES

    meta = saved.state_dict_metadata
    for i, opt in enumerate(optimizers.optimizers):
        if not hasattr(opt, "state_names"):
            continue
        prefix = f"optim{i}.state."
        found: dict[str, dict] = {}  # table -> {state name: "dh" or width}
        for key, entry in meta.items():
            if not key.startswith(prefix) or ".table.weight." not in key:
                continue
            table, name = key[len(prefix) :].rsplit(".", 1)
            weight = meta.get(f"model.{table}")
            if name == "step" or weight is None or len(entry.size) != 2:
                continue
            width = entry.size[1]
            found.setdefault(table, {})[name] = "dh" if width == weight.size[1] else width
        for shape in found.values():
            if shape != ENGRAM_STATES[opt.kind]:
                kind = next((k for k, v in ENGRAM_STATES.items() if v == shape), str(shape))
                raise TableStateMismatch(
                    f"checkpoint {path} keeps the Engram tables' optimizer state of "
                    f"optimizer.engram_state={kind!r}, this job uses {opt.kind!r}: resume with "
                    f"optimizer.engram_state={kind!r}, or start a new job.dump_folder"
                )


def _state(model, optimizers, blocked: bool = True, saved=None) -> dict:
    """Model and optimizer states for DCP.

    Engram tables (weights and row-wise Adam moments) become ``RowBlocks``: saved in fixed row
    blocks, so any sharding or placement loads them streamed. ``blocked=False`` (asynchronous
    saves, which stage plain tensors, and load targets of in-memory tables) keeps in-memory
    tables as plain or ``Shard(0)`` tensors; offloaded tables are always blocks, on load chunked
    like the ``saved`` checkpoint's items (``_saved_block_rows``). Other row-sharded parameters
    are ``Shard(0)`` DTensors.
    """
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    sharded, tables = _sharded_modules(model), _table_modules(model)
    state = {"model": get_model_state_dict(model)}
    for fqn, table in tables.items():
        if blocked or _offloaded(table):
            state["model"][fqn] = _row_blocks(table, "weight", None, saved, f"model.{fqn}")
    for i, opt in enumerate(optimizers.optimizers):
        optim_state = get_optimizer_state_dict(model, opt, options=flat)
        for key, value in optim_state.items():
            owner = _owner_of_state(key, sharded)
            if owner is not None and torch.is_tensor(value) and value.dim() >= 1:
                optim_state[key] = owner[0].to_global(value)
        for fqn, table in tables.items():
            if table.weight not in opt.state or not (blocked or _offloaded(table)):
                continue
            for name in getattr(opt, "state_names", ("exp_avg", "exp_avg_sq")):
                key = f"state.{fqn}.{name}"
                optim_state[key] = _row_blocks(
                    table, name, opt.state[table.weight], saved, f"optim{i}.{key}"
                )
        state[f"optim{i}"] = optim_state
    return state


def _set_state(model, optimizers, state: dict) -> None:
    """Apply a loaded state. Table blocks were loaded in place: their sources go back in (an
    offloaded table's ``_load_from_state_dict`` then drops its now stale cache)."""
    state["model"] = {
        k: v._source if isinstance(v, RowBlocks) else v for k, v in state["model"].items()
    }
    set_model_state_dict(model, state["model"])
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    sharded = _sharded_modules(model)
    for i, opt in enumerate(optimizers.optimizers):
        optim_state = {}
        for key, value in state[f"optim{i}"].items():
            if isinstance(value, RowBlocks):
                if _offloaded_source(value):
                    continue  # the moments live in the tier, loaded there
                value = value._source
            owner = _owner_of_state(key, sharded)
            if owner is not None and hasattr(value, "to_local"):
                module, param = owner  # moments have the parameter's local shape (padding too)
                value = module.from_global(value, getattr(module, param))
            optim_state[key] = value
        set_optimizer_state_dict(model, opt, optim_state, options=flat)


def _table_modules(model) -> dict:
    """Engram table weight FQN (as in state dicts) -> table module, every placement."""
    from models.tables.offload import OffloadedEngramTable
    from models.tables.table import EngramTable
    from parallel.engram_table_parallel import ShardedEngramTable

    kinds = (EngramTable, ShardedEngramTable, OffloadedEngramTable)
    return {
        f"{_clean_fqn(name)}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, kinds)
    }


def _clean_fqn(name: str) -> str:
    for wrapper in ("module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "") if name.startswith(wrapper) else name
        name = name.replace(f".{wrapper}", ".")
    return name


def _offloaded(table) -> bool:
    return hasattr(table, "store")


def _offloaded_source(blocks: RowBlocks) -> bool:
    return getattr(blocks, "_tier_field", False)


def _row_blocks(table, name: str, optim_state, saved, key: str) -> RowBlocks:
    """The blocks of a table's ``name`` (weight or a moment), wherever the rows live."""
    first, rows = getattr(table, "row_start", 0), table.num_rows
    if _offloaded(table):
        table.cache.flush()  # the store is complete (a no-op right after a load)
        source = table.store.field(name)
    else:
        source = table.weight.detach() if name == "weight" else optim_state[name]
    if hasattr(source, "to_local"):
        source = source.to_local()
    blocks = RowBlocks(source, first, rows, _saved_block_rows(saved, key) if saved else None)
    blocks._tier_field = _offloaded(table)
    return blocks


def _saved_block_rows(metadata, key: str) -> int | None:
    """Chunk a load like the checkpoint's items: a table saved whole (an older or asynchronous
    checkpoint) is read once rather than once per block."""
    entry = metadata.state_dict_metadata.get(key)
    if entry is None or not hasattr(entry, "chunks"):
        return None
    largest = max(chunk.sizes[0] for chunk in entry.chunks)
    return None if largest <= TABLE_BLOCK_ROWS else entry.size[0]


def _sharded_modules(model) -> dict[str, tuple[torch.nn.Module, str]]:
    """Parameter FQN -> (module, parameter name) for row-sharded parameters
    (``parallel.sharding``)."""
    return {
        f"{name.removeprefix('module.')}.{param}": (module, param)
        for name, module in model.named_modules()
        if hasattr(module, "to_global")
        for param in module.sharded_params
    }


def _owner_of_state(key: str, sharded: dict) -> tuple[torch.nn.Module, str] | None:
    for fqn, owner in sharded.items():
        if key.startswith(f"state.{fqn}."):
            return owner
    return None
