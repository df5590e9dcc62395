"""``python -m pretrain.train --config FILE [--section.key=value ...]``: the training job.

Runs as one process or under torchrun / slurm. Builds the model on meta, applies the parallel plan,
initialises, resumes the newest complete checkpoint in ``job.dump_folder``, then trains with
gradient accumulation, optional bf16 autocast, clipping, periodic evaluation and checkpoints.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data.loader import StatefulLoader
from data.mixture import check_sources
from models.accounting import account
from models.args import model_args_to_dict
from models.engram import GateMonitor, unique_row_fraction
from models.quantize import quantize_identity
from models.spec import get_model_spec
from models.tables.offload import OffloadedTables, place_engram_tables, tier_scalars
from parallel.dims import ParallelDims
from parallel.distributed import (
    all_reduce_sum_,
    cpu_group_for,
    destroy,
    env_world_size,
    init_distributed,
)
from parallel.replicas import LighthouseUnreachable
from pretrain.builders import build_hasher, build_model_args, build_tokenizer, mixture_and_folder
from pretrain.checkpoint import CheckpointManager
from pretrain.config import Config, parse_args, to_toml
from pretrain.fault_tolerance import FaultTolerance, ReplicasLost, TrainingHandles
from pretrain.metrics import MetricsLogger
from pretrain.optimizer import Optimizers, lr_factor
from pretrain.pipeline_runner import PipelineRunner
from pretrain.preemption import StopRequest
from pretrain.step import StepModel, forward_backward, lookup_planners, optimizer_step
from pretrain.validate import Validator

log = logging.getLogger("pretrain")


class Trainer:
    """Owns the components of one job; ``fit()`` trains to ``training.steps``."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.training
        # every layout check runs before any process-group work
        self.dims = ParallelDims.from_config(cfg.parallelism, env_world_size())
        self.spec = get_model_spec(cfg.model.family)
        self.spec.validate_parallelism(
            self.spec.resolve_args(
                cfg.model.flavor, cfg.model.overrides, vocab_size=cfg.model.vocab_size
            ),
            self.dims,
            cfg.parallelism.sequence_parallel,
            cfg.data.seq_len,
        )
        self.dist = init_distributed(t.device, cfg.parallelism.timeout_seconds)
        self.rank, self.device = self.dist.rank, self.dist.device
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        mesh = self.dims.build_mesh(self.device.type) if self.dist.world_size > 1 else None
        self.run_folder = Path(cfg.job.dump_folder)
        # under fault tolerance each replica group logs in a folder of its own; the
        # checkpoints stay shared (the first group of the quorum writes them)
        ft = cfg.fault_tolerance
        self.log_folder = self.run_folder
        if ft.enable:
            self.log_folder = self.run_folder / f"replica_{ft.replica_id}"
        if self.rank == 0:
            self.log_folder.mkdir(parents=True, exist_ok=True)
            (self.log_folder / "config.toml").write_text(to_toml(cfg))
        folder, mixture = mixture_and_folder(cfg.data, self.rank)
        self.tokenizer = build_tokenizer(cfg.data, folder)
        if mixture:
            check_sources(
                mixture,
                self.tokenizer,
                cfg.data.strict,
                index_dir=cfg.data.index_dir,
                workers=max(1, cfg.data.num_workers),
                rank=self.rank,
                world=self.dist.world_size,
            )
            if not any(s.val_path for s in mixture):
                log.warning("data.mixture: no source has a val_path; val_loss is not computed")
        self.args = build_model_args(cfg.model, self.tokenizer, cfg.data.seq_len)
        self.spec.validate_parallelism(  # now with the tokenizer's vocabulary
            self.args, self.dims, cfg.parallelism.sequence_parallel, cfg.data.seq_len
        )
        self.hasher = build_hasher(self.args, self.tokenizer)
        # the family's model converters, each from its own config section
        self.converters = self.spec.build_converters(lambda name: getattr(cfg, name))
        self.sm = self._build_model(mesh)
        self.tables = OffloadedTables(self.sm.inner)
        self._tier_seconds = 0.0  # step time since the last tier metrics
        self._first_nonfinite: torch.Tensor | None = None  # on the device (``_watch_finite``)
        self.optimizers = Optimizers(self.sm.model, cfg.optimizer)
        stream_kwargs = self._stream_kwargs(folder, mixture)
        self.loader = StatefulLoader(
            stream_kwargs if mixture else {**stream_kwargs, "split": "train"},
            cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.validator = Validator(
            stream_kwargs,
            cfg.metrics.eval_batches,
            self.dims.dp_rank(self.rank),
            self.dims.dp_degree,
            self.sm.plan.dp_group,
            self.device,
            self.sm.plan.cp_group,
        )
        # downstream tasks: resolved and tokenised now, so a bad label stops the job up front
        self.downstream = self._downstream() if cfg.downstream.tasks else None
        self.last_downstream: dict[str, float] = {}  # the last evaluation's scalars
        self.step, self.last_checkpoint, self.last_batch = 0, None, None
        self.resumed_ft: dict = {}  # the fault-tolerance manager's state in the checkpoint
        self.ckpt = self._resume()
        self.gates = GateMonitor(self.sm.inner)
        self.metrics = MetricsLogger(
            cfg.metrics,
            self.log_folder,
            self.rank,
            t.steps,
            self.step,
            self.device,
            account(self.args, cfg.data.seq_len).flops_per_token,
        )
        # last: a group that joins the quorum is ready to train (the others wait for it)
        self.ft = self._fault_tolerance() if ft.enable else None

    # ----- set-up -----
    def _fault_tolerance(self) -> FaultTolerance:
        """The replica group's manager, given the state it may read and restore by name."""

        def set_step(step: int) -> None:
            self.step = step

        handles = TrainingHandles(
            model=self.sm.model,
            optimizers=self.optimizers,
            loader_state=self.loader.state_dict,
            load_loader_state=self.loader.load_state_dict,
            batches_consumed=lambda: self.loader.consumed,
            get_step=lambda: self.step,
            set_step=set_step,
        )
        ft = FaultTolerance(
            self.cfg.fault_tolerance,
            handles,
            rank=self.rank,
            world_size=self.dist.world_size,
            device=self.device,
            log_folder=self.log_folder,
            resumed=self.resumed_ft,
        )
        self.sm.plan.replicas = ft.sync  # the step averages over the groups and votes
        return ft

    def _build_model(self, mesh) -> StepModel:
        cfg, t = self.cfg, self.cfg.training
        with torch.device("meta"):
            model = self.spec.model_cls(self.args)
        for converter in self.converters:
            converter.convert(model)
        model, inner, plan = self.spec.parallelize(
            model,
            self.dims,
            mesh,
            self.device,
            t.seed,
            activation_checkpoint=cfg.activation_checkpoint.mode,
            compile_blocks=cfg.compile.enable,
            stages_per_rank=cfg.parallelism.pipeline_stages_per_rank,
            sequence_parallel=cfg.parallelism.sequence_parallel,
            mixed_precision=t.mixed_precision,
            place_tables=self._table_placer(),
        )
        pipeline = None
        if self.dims.pp > 1:
            pipeline = PipelineRunner(plan, cfg.parallelism, self.device, t.grad_accum_steps, inner)
        return StepModel(model, inner, plan, pipeline, t.mixed_precision)

    def _downstream(self):
        """The ``[downstream]`` evaluator over this rank's data-parallel place (a pipeline
        scores rows of the training shape, which its schedule was built for)."""
        from pretrain.downstream.evaluator import DownstreamEvaluator

        t, d, pipeline = self.cfg.training, self.cfg.data, self.sm.pipeline
        group = None  # the data-parallel ranks (the plan's None: the whole world)
        if self.dims.dp_degree > 1:
            group = cpu_group_for(self.sm.plan.dp_group or dist.group.WORLD)
        # a pipeline's rows are data.seq_len long: its contexts are cut there
        max_len = min(self.args.max_seq_len, d.seq_len) if pipeline else self.args.max_seq_len
        evaluator = DownstreamEvaluator(
            self.cfg.downstream,
            self.tokenizer,
            self.hasher,
            max_len,
            self.dims.dp_rank(self.rank),
            self.dims.dp_degree,
            group,
            self.device,
            default_batch_tokens=t.batch_size * d.seq_len,
            fixed=(t.batch_size, d.seq_len) if pipeline is not None else None,
            plan_chunks=pipeline.microbatches if pipeline is not None else 1,
        )
        evaluator.requests()
        return evaluator

    def _table_placer(self):
        """``[engram_table] placement``: what swaps this rank's tables (whole, or its row shards)
        for host or disk ones, on meta before the initialisation; None for ``device``."""
        e = self.cfg.engram_table
        if e.placement == "device":
            return None
        if self.args.engram is None:
            raise ValueError(
                f"engram_table.placement={e.placement!r} but model.flavor="
                f"{self.cfg.model.flavor!r} has no Engram layers; use placement='device'"
            )
        if self.dims.batch_degree > 1 and self.dims.engram_shard == 1:
            raise ValueError(
                f"engram_table.placement={e.placement!r} with {self.dims.batch_degree} "
                "data/context-parallel ranks would keep a whole table in every rank's tier; set "
                f"parallelism.engram_shard_degree={self.dims.batch_degree} so each rank's tier "
                "holds its row shard"
            )
        t, ft = self.cfg.training, self.cfg.fault_tolerance
        lookups = t.batch_size * self.cfg.data.seq_len * self.args.engram.num_heads
        folder = Path(e.path) if e.path else self.log_folder / "engram_tables"
        if ft.enable and e.path:  # every replica group keeps its own copy
            folder = folder / f"replica_{ft.replica_id}"
        # under fault tolerance a step also updates the rows the other groups looked up
        replicas = ft.group_size if ft.enable else 1
        return functools.partial(
            place_engram_tables,
            placement=e.placement,
            cache_size=e.cache_size,
            device=self.device,
            folder=folder,
            hash_config=self.hasher.to_config_dict(),
            min_cache_rows=(t.grad_accum_steps * replicas + 1) * lookups,
            engram_state=self.cfg.optimizer.engram_state,
        )

    def _stream_kwargs(self, folder: Path, mixture: list | None) -> dict:
        """The loader's arguments: this rank's data shard, the hasher and the tables' planners
        (``mixture``: the sources of ``data.mixture``, else the one folder)."""
        t, d = self.cfg.training, self.cfg.data
        if mixture:
            tok = self.tokenizer
            where = dict(specs=mixture, tokenizer_path=str(tok.path), eos_id=tok.eos_id)
            where["index_dir"] = d.index_dir
        else:
            where = dict(folder=str(folder), url_prefix=d.url_prefix or None)
        # replica groups read disjoint shares of every global batch (group g: data-parallel
        # ranks g * dp .. (g + 1) * dp - 1)
        ft = self.cfg.fault_tolerance
        groups, group = (ft.group_size, ft.replica_id) if ft.enable else (1, 0)
        return dict(
            **where,
            batch_size=t.batch_size,
            seq_len=d.seq_len,
            vocab_size=self.tokenizer.vocab_size,
            seed=t.seed,
            dp_rank=group * self.dims.dp_degree + self.dims.dp_rank(self.rank),
            dp_degree=groups * self.dims.dp_degree,
            cp_rank=self.dims.cp_rank(self.rank),
            cp_degree=self.dims.cp,
            hasher=self.hasher,
            strict=d.strict,
            planners=lookup_planners(self.sm.inner),
            plan_chunks=self.sm.pipeline.microbatches if self.sm.pipeline is not None else 1,
        )

    def _resume(self) -> CheckpointManager | None:
        c = self.cfg.checkpoint
        if not c.enable:
            return None
        identity = {
            "tokenizer_identity": self.tokenizer.identity,
            "engram_hash": self.hasher.to_config_dict() if self.hasher else None,
            # what conversions (launch.convert) and launch.evaluate rebuild the model from
            "model_args": model_args_to_dict(self.args),
            "tokenizer_path": str(Path(self.tokenizer.path).resolve()),
            "quantize": quantize_identity(self.cfg.quantize),  # a switch is allowed, with a warning
        }
        ckpt = CheckpointManager(
            self.run_folder / c.folder,
            c.keep_last,
            identity,
            c.async_mode,
            shared=self.cfg.fault_tolerance.enable,
        )
        state = ckpt.load_latest(self.sm.model, self.optimizers) if c.load else None
        if state is not None:
            if "loader" in state:
                self.loader.load_state_dict(state["loader"])
            self.resumed_ft = state.get("ft") or {}
            self.step, self.last_checkpoint = state["step"], state["path"]
        elif c.initial_load_path:
            optimizers = None if c.initial_load_model_only else self.optimizers
            ckpt.load_initial(c.initial_load_path, self.sm.model, optimizers)
        return ckpt

    @property
    def model(self):
        return self.sm.model

    @property
    def inner(self):
        return self.sm.inner

    # ----- one step -----
    def train_step(self) -> dict | None:
        """One optimizer step; None when it did not commit (fault tolerance: a replica group
        failed during it, or too few took part; the next call retries its batches)."""
        t = self.cfg.training
        if self.ft is not None and self.ft.begin_step():  # took its peer's state
            self._first_nonfinite = None
        start = self.loader.state_dict() if self.ft is not None else None  # for a retry
        factor = lr_factor(self.step + 1, t.steps, self.cfg.lr_scheduler)
        self.optimizers.set_lr(factor)
        ce_sum, aux_sum = torch.zeros((), device=self.device), {}
        for micro in range(t.grad_accum_steps):
            batch = next(self.loader)
            if self.tables and self.cfg.engram_table.prefetch:
                self.tables.prefetch(self.loader.upcoming())  # while this microbatch computes
            batch = batch.to(self.device)
            out = forward_backward(
                self.sm, batch, scale=1.0 / t.grad_accum_steps, sync=micro == t.grad_accum_steps - 1
            )
            ce_sum += out.ce / t.grad_accum_steps
            for k, v in out.aux.items():
                aux_sum[k] = aux_sum.get(k, 0.0) + v / t.grad_accum_steps
        if self.sm.plan.cp_group is not None:  # the whole rows' loss, not this rank's chunks
            all_reduce_sum_(ce_sum, self.sm.plan.cp_group)
            ce_sum /= self.dims.cp
        self._watch_finite(ce_sum)
        grad_norm = optimizer_step(self.sm, self.optimizers, t.max_norm)
        for converter in self.converters:
            converter.post_optimizer_hook(self.sm.model)
        if self.ft is not None and not self.ft.end_step(start):
            return None
        self.step += 1
        self.last_batch = batch
        # device tensors: read (a host synchronisation) only on logging steps, by ``host_values``
        return {
            "loss": ce_sum,
            "grad_norm": grad_norm,
            "lr": self.optimizers.base_lr * factor,
            "aux": aux_sum,
        }

    def _watch_finite(self, loss: torch.Tensor) -> None:
        """Remember, on the device, the first step whose loss was not finite."""
        bad = ~torch.isfinite(loss.detach())
        if self._first_nonfinite is None:
            self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=loss.device)
        first = (self._first_nonfinite < 0) & bad
        self._first_nonfinite = torch.where(first, self.step + 1, self._first_nonfinite)

    def check_finite(self) -> None:
        """Stop (FloatingPointError) if a loss since the start was NaN or infinite. Run before
        anything is logged or saved, so no checkpoint holds a step after it."""
        if self._first_nonfinite is None:
            return
        step = int(self._first_nonfinite)
        if step >= 0:
            raise FloatingPointError(
                f"the loss was not finite at step {step}; stopping without saving. The last "
                f"good checkpoint is {self.last_checkpoint or '(none yet)'}; lower "
                "optimizer.lr or check the data"
            )

    def host_values(self, values: dict) -> dict:
        """A step's values read to the host (the logging steps' one synchronisation)."""
        self.check_finite()
        return {
            "loss": float(values["loss"]),
            "grad_norm": float(values["grad_norm"]),
            "lr": values["lr"],
            "aux": {k: float(v) for k, v in values["aux"].items()},
        }

    def evaluate(self) -> tuple[float, int]:
        return self.validator.run(self.sm)

    def save_downstream_questions(self) -> None:
        """``downstream_questions.json`` (rank 0): the step and every question's metrics of
        every task (``launch.experiments`` pairs runs over them)."""
        if self.rank == 0:
            record = {"step": self.step, "tasks": self.downstream.per_question}
            (self.log_folder / "downstream_questions.json").write_text(json.dumps(record) + "\n")

    def save_val_windows(self) -> None:
        """``val_windows.json`` in the run folder (rank 0): the step and the mean loss of every
        validation window of the last evaluation, for paired comparisons between runs
        (``launch.experiments``) that were trained elsewhere (torchrun, slurm)."""
        if self.rank == 0 and self.validator.window_losses:
            record = {"step": self.step, "val_windows": self.validator.window_losses}
            (self.log_folder / "val_windows.json").write_text(json.dumps(record) + "\n")

    def data_scalars(self) -> dict[str, float]:
        """A mixture's ``data/tokens/<name>`` (global, cumulative), ``data/epoch/<name>`` and
        ``data/skipped/<name>`` (records of the source that its document index skipped)."""
        state = self.loader.last_state
        if "schedule" not in state:
            return {}
        specs = self.loader.dataset.stream_kwargs["specs"]
        seq_len = self.cfg.data.seq_len
        out = {}
        for i, spec in enumerate(specs):
            out[f"data/tokens/{spec.name}"] = state["schedule"]["counts"][i] * seq_len
            out[f"data/epoch/{spec.name}"] = state["epochs"][spec.name]
            out[f"data/skipped/{spec.name}"] = state.get("skipped", {}).get(spec.name, 0)
        return out

    def engram_scalars(self) -> dict[str, float]:
        scalars = self.gates.scalars()
        if self.tables:
            scalars.update(tier_scalars(self.tables.take_stats(), self._tier_seconds))
            self._tier_seconds = 0.0
        if self.last_batch is not None and self.hasher is not None:
            fraction = unique_row_fraction(self.last_batch.engram, self.hasher.spec)
            if fraction is not None:
                scalars["engram/unique_rows_frac"] = fraction
        return scalars

    def save(self, blocking: bool = False) -> None:
        if self.ckpt is not None and (self.ft is None or self.ft.saves):
            train_state = {"loader": self.loader.state_dict()}
            if self.ft is not None:
                train_state["ft"] = self.ft.train_state()
            path = self.ckpt.save(self.step, self.sm.model, self.optimizers, train_state, blocking)
            self.last_checkpoint = str(path)

    # ----- the loop -----
    def fit(self) -> dict:
        t, m = self.cfg.training, self.cfg.metrics
        # tokens per device (torchtitan's tps): the step's tokens over every rank; tp, pp and cp
        # ranks share their data-parallel replica's tokens
        tokens_per_step = t.batch_size * t.grad_accum_steps * self.cfg.data.seq_len
        tokens_per_step *= self.dims.dp_degree / self.dims.world_size
        val_loss, preempted = None, False
        stop = StopRequest()
        stop_group = cpu_group_for(dist.group.WORLD) if dist.is_initialized() else None
        while self.step < t.steps:
            wait_before, started = self.loader.wait_seconds, time.perf_counter()
            values = self.train_step()
            self._tier_seconds += time.perf_counter() - started
            if values is None:  # not committed: nothing to log, evaluate or save
                if stop.requested(stop_group):
                    log.warning(
                        "stopped on %s while a step could not commit",
                        stop.signal_name or "a peer's signal",
                    )
                    preempted = True
                    break
                continue
            self.metrics.step_done(tokens_per_step, self.loader.wait_seconds - wait_before)
            if self.metrics.should_log(self.step):
                ft_scalars = self.ft.scalars() if self.ft is not None else {}
                self.metrics.log_train(
                    self.step,
                    self.host_values(values),
                    {**self.engram_scalars(), **self.data_scalars(), **ft_scalars},
                )
            if self.step % m.eval_freq == 0 or self.step == t.steps:
                self.check_finite()
                val_loss, tokens = self.evaluate()
                self.metrics.log_eval(self.step, val_loss, tokens, self.validator.per_source)
                self.save_val_windows()
            every = self.cfg.downstream.interval
            if self.downstream is not None and (self.step % every == 0 or self.step == t.steps):
                self.check_finite()
                self.last_downstream = self.downstream.run(self.sm)
                self.metrics.log_downstream(self.step, self.last_downstream)
                self.save_downstream_questions()
            saved = self.step % self.cfg.checkpoint.interval == 0 or self.step == t.steps
            if saved:
                self.check_finite()
                self.save(blocking=self.step == t.steps)
            if stop.requested(stop_group) and self.step < t.steps:
                if not saved:
                    self.check_finite()
                    self.save(blocking=True)
                log.warning(
                    "stopped at step %d on %s; resume with the same command",
                    self.step,
                    stop.signal_name or "a peer's signal",
                )
                preempted = True
                break
        stop.restore()
        if self.ckpt is not None:
            self.ckpt.finish()  # an asynchronous save still in flight
        if self.ft is not None:
            if self.cfg.fault_tolerance.state_digest:
                self.ft.write_digest()
            self.ft.shutdown()
        if val_loss is None and not preempted:  # resumed at the final step
            val_loss, tokens = self.evaluate()
            self.metrics.log_eval(self.step, val_loss, tokens, self.validator.per_source)
        self.metrics.close()
        return {
            "step": self.step,
            "val_loss": val_loss,
            "run_folder": str(self.run_folder),
            "log_folder": str(self.log_folder),
            "checkpoint": self.last_checkpoint,
            "preempted": preempted,
            "downstream": self.last_downstream,
        }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = parse_args(argv)
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError, LighthouseUnreachable) as err:  # user errors
        log.error("%s: %s", type(err).__name__, err)
        destroy()
        return 2
    try:
        summary = trainer.fit()
    except FloatingPointError as err:
        log.error("%s", err)
        return 3
    except ReplicasLost as err:
        log.error("%s", err)
        return 4
    finally:
        trainer.loader.close()
        destroy()
    if trainer.rank == 0 and summary["preempted"]:
        print(f"\nstopped at step {summary['step']}: {summary['checkpoint']}", flush=True)
    elif trainer.rank == 0:
        folder, checkpoint = Path(summary["log_folder"]), summary["checkpoint"]
        generate = (
            f"\n  generate:    {_python()} -m launch.generate --checkpoint {checkpoint} "
            "--prompt 'def main(' --max_new_tokens 48"
            if checkpoint
            else ""
        )
        print(
            f"\ndone: step {summary['step']}, held-out loss {summary['val_loss']:.4f}\n"
            f"  logs:        {folder / 'metrics.jsonl'} (TensorBoard: "
            f"{folder / cfg.metrics.save_tb_folder})\n"
            f"  config:      {folder / 'config.toml'}\n"
            f"  checkpoint:  {checkpoint or '(checkpoint.enable = false)'}{generate}",
            flush=True,
        )
        if summary["downstream"]:
            print(downstream_table(summary["downstream"]), flush=True)
    return 0


def downstream_table(scalars: dict[str, float]) -> str:
    """The last downstream evaluation's headline metric of each task, as the run ends."""
    from pretrain.metrics import headline

    lines = ["  downstream (python -m launch.evaluate --tasks scores any checkpoint):"]
    for task, metric, value in headline(scalars):
        lines.append(f"    {task:34s} {metric:12s} {value:.4f}")
    return "\n".join(lines)


def _python() -> str:
    """This interpreter, as a user would type it here (``.venv/bin/python``)."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


if __name__ == "__main__":
    sys.exit(main())
