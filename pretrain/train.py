"""``python -m pretrain.train --config FILE [--section.key=value ...]``: the training job.

Runs as one process or under torchrun / slurm. Builds the model on meta, applies the parallel plan,
initialises, resumes the newest complete checkpoint in ``job.dump_folder``, then trains with
gradient accumulation, optional bf16 autocast, clipping, periodic evaluation and checkpoints.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data.dataset import PackedShardStream
from data.loader import StatefulLoader, batch_to_torch
from models.accounting import account
from models.flavors import apply_overrides, get_flavor
from models.parallel_plans import validate_parallelism
from models.parallelize import parallelize_deepseek_engram
from models.transformer import Transformer
from parallel.dims import ParallelDims
from parallel.distributed import all_reduce_sum_, destroy, env_world_size, init_distributed
from parallel.tensor_parallel import vocab_parallel_loss
from pretrain.builders import build_hasher, build_model_args, build_tokenizer, ensure_dataset
from pretrain.checkpoint import CheckpointManager
from pretrain.config import Config, load_config, to_toml
from pretrain.metrics import MetricsLogger
from pretrain.optimizer import Optimizers, clip_grad_norm, lr_factor
from pretrain.pipeline_runner import PipelineRunner

log = logging.getLogger("pretrain")


class Trainer:
    """Owns the components of one job; ``fit()`` trains to ``training.steps``."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.training
        # every layout check runs before any process-group work
        self.dims = ParallelDims.from_config(cfg.parallelism, env_world_size())
        flavor = apply_overrides(get_flavor(cfg.model.flavor), cfg.model.overrides)
        flavor.vocab_size = cfg.model.vocab_size or flavor.vocab_size
        validate_parallelism(flavor, self.dims, cfg.parallelism.sequence_parallel, cfg.data.seq_len)
        self.dist = init_distributed(t.device, cfg.parallelism.timeout_seconds)
        self.rank, self.device = self.dist.rank, self.dist.device
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        mesh = self.dims.build_mesh(self.device.type) if self.dist.world_size > 1 else None
        self.run_folder = Path(cfg.job.dump_folder)
        if self.rank == 0:
            self.run_folder.mkdir(parents=True, exist_ok=True)
            (self.run_folder / "config.toml").write_text(to_toml(cfg))
        folder = ensure_dataset(cfg.data, self.rank)
        self.tokenizer = build_tokenizer(cfg.data, folder)
        self.args = build_model_args(cfg.model, self.tokenizer, cfg.data.seq_len)
        validate_parallelism(  # now with the tokenizer's vocabulary
            self.args, self.dims, cfg.parallelism.sequence_parallel, cfg.data.seq_len
        )
        self.hasher = build_hasher(self.args, self.tokenizer)
        with torch.device("meta"):
            model = Transformer(self.args)
        self.model, self.inner, self.plan = parallelize_deepseek_engram(
            model,
            self.dims,
            mesh,
            self.device,
            t.seed,
            activation_checkpoint=cfg.activation_checkpoint.mode,
            compile_blocks=cfg.compile.enable,
            stages_per_rank=cfg.parallelism.pipeline_stages_per_rank,
            sequence_parallel=cfg.parallelism.sequence_parallel,
        )
        self.dp_group = self.dims.dp_group(mesh) if mesh is not None else None
        self.optimizers = Optimizers(self.model, cfg.optimizer)
        self.pipeline = None
        if self.dims.pp > 1:
            self.pipeline = PipelineRunner(
                self.plan, cfg.parallelism, self.device, t.grad_accum_steps, self.inner
            )
        # mesh layout (pp, dp_replicate, dp_shard, tp): all tp and pp peers share a dp rank
        dp_rank = (self.rank // self.dims.tp) % self.dims.dp_degree
        self.stream_kwargs = dict(
            folder=str(folder),
            batch_size=t.batch_size,
            seq_len=cfg.data.seq_len,
            vocab_size=self.tokenizer.vocab_size,
            seed=t.seed,
            dp_rank=dp_rank,
            dp_degree=self.dims.dp_degree,
            hasher=self.hasher,
            strict=cfg.data.strict,
            document_reset=bool(self.args.engram and self.args.engram.document_reset),
            url_prefix=cfg.data.url_prefix or None,
            table_layout={
                e.layer_id: e.table.table_layout()
                for e in self.inner.engram_layers()
                if hasattr(e.table, "table_layout")
            },
        )
        self.loader = StatefulLoader({**self.stream_kwargs, "split": "train"}, cfg.data.num_workers)
        identity = {
            "tokenizer_identity": self.tokenizer.identity,
            "engram_hash": self.hasher.to_config_dict() if self.hasher else None,
        }
        c = cfg.checkpoint
        self.ckpt = (
            CheckpointManager(self.run_folder / c.folder, c.keep_last, identity)
            if c.enable
            else None
        )
        self.step = 0
        self.last_checkpoint = None
        if self.ckpt is not None and c.load:
            state = self.ckpt.load_latest(self.model, self.optimizers)
            if state is not None:
                if "loader" in state:
                    self.loader.load_state_dict(state["loader"])
                self.step, self.last_checkpoint = state["step"], state["path"]
        self.accounting = account(self.args, cfg.data.seq_len)
        self.metrics = MetricsLogger(
            cfg.metrics, self.run_folder, self.rank, t.steps, self.step, self.device
        )
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if t.mixed_precision == "bf16"
            else contextlib.nullcontext()
        )

    # ----- one step -----
    def _to_device(self, batch: dict) -> dict:
        def move(t):
            return t.to(self.device, non_blocking=True)

        moved = {k: move(v) for k, v in batch.items() if torch.is_tensor(v)}
        if "hash_ids" in batch:
            moved["hash_ids"] = {k: move(v) for k, v in batch["hash_ids"].items()}
        if "engram_plans" in batch:  # split counts stay on the host: no device sync to read them
            moved["engram_plans"] = {
                k: type(p)(move(p.unique_ids), p.send_counts, move(p.inverse))
                for k, p in batch["engram_plans"].items()
            }
        return moved

    def _forward_loss(self, batch: dict):
        if self.pipeline is not None:  # evaluation through the schedule
            with self.autocast:
                return self.pipeline.evaluate(batch), {}
        with self.autocast:
            out = self.model(
                batch["tokens"],
                batch.get("hash_ids"),
                batch["positions"],
                batch["doc_ids"],
                batch.get("engram_plans"),
            )
        with vocab_parallel_loss(self.dims.tp > 1):
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), batch["labels"].flatten())
        if hasattr(ce, "to_local"):  # a replicated DTensor from the vocab-parallel loss
            ce = ce.to_local()
        return ce, out.aux_losses

    def train_step(self) -> dict:
        accum = self.cfg.training.grad_accum_steps
        factor = lr_factor(self.step + 1, self.cfg.training.steps, self.cfg.lr_scheduler)
        self.optimizers.set_lr(factor)
        ce_sum, aux_sum = torch.zeros((), device=self.device), {}
        for micro in range(accum):
            batch = self._to_device(next(self.loader))
            if self.pipeline is not None:
                with self.autocast:
                    ce_sum += self.pipeline.train(batch).to(self.device) / accum
                continue
            sync = micro == accum - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else self.model.no_sync():
                ce, aux = self._forward_loss(batch)
                loss = ce + sum(aux.values()) if aux else ce
                with vocab_parallel_loss(self.dims.tp > 1):
                    (loss / accum).backward()
            ce_sum += ce.detach() / accum
            for k, v in aux.items():
                aux_sum[k] = aux_sum.get(k, 0.0) + v.detach() / accum
        loss_value = ce_sum.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"loss is {loss_value} at step {self.step + 1}; stopping without saving. The "
                f"last good checkpoint is {self.last_checkpoint or '(none yet)'}; lower "
                "optimizer.lr or check the data"
            )
        self.plan.sync_grads()
        grad_norm = clip_grad_norm(
            list(self.model.parameters()),
            self.cfg.training.max_norm,
            self.plan.sharded_groups,
            self.plan.pp_cpu_group,
        )
        self.optimizers.step()
        self.optimizers.zero_grad()
        self._update_moe_biases()
        self.step += 1
        self.last_batch = batch
        return {
            "loss": loss_value,
            "grad_norm": grad_norm.item(),
            "lr": self.optimizers.base_lr * factor,
            "aux": {k: float(v) for k, v in aux_sum.items()},
        }

    def _update_moe_biases(self) -> None:
        for moe in self.inner.moe_layers():
            all_reduce_sum_(moe.router.tokens_per_expert, self.dp_group)
            for group in self.plan.token_groups:  # sequence parallel: each tp rank saw a shard
                all_reduce_sum_(moe.router.tokens_per_expert, group)
            moe.router.update_bias()

    # ----- evaluation, metrics -----
    @torch.no_grad()
    def evaluate(self) -> tuple[float, int]:
        # the same global batches whatever the layout: batch i goes to DP rank i % dp_degree
        self.model.eval()
        kwargs = {
            **self.stream_kwargs,
            "split": "val",
            "shuffle": False,
            "dp_rank": 0,
            "dp_degree": 1,
        }
        batches = [
            b
            for b, _ in itertools.islice(
                PackedShardStream(**kwargs).batches(), self.cfg.metrics.eval_batches
            )
        ]
        dp, dp_rank = self.stream_kwargs["dp_degree"], self.stream_kwargs["dp_rank"]
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        slots = -(-len(batches) // dp) if batches else 0
        for slot in range(slots):
            index = slot * dp + dp_rank
            # every rank runs the same number of forwards (sharded tables exchange rows in each);
            # a rank past the end repeats a batch and does not count it
            batch = batches[min(index, len(batches) - 1)]
            ce, _ = self._forward_loss(self._to_device(batch_to_torch(batch)))
            if index < len(batches):
                tokens = batch["labels"].size
                total += torch.tensor(
                    [ce.item() * tokens, tokens], dtype=torch.float64, device=self.device
                )
        all_reduce_sum_(total, self.dp_group)
        self.model.train()
        if total[1] == 0:
            raise ValueError(
                "the validation split has fewer tokens than one batch; lower training.batch_size"
            )
        return (total[0] / total[1]).item(), int(total[1].item())

    def engram_scalars(self) -> dict[str, float]:
        scalars, fracs = {}, []
        for engram in self.inner.engram_layers():
            if hasattr(engram, "last_gate_mean"):
                scalars[f"engram/gate_mean/layer{engram.layer_id}"] = engram.last_gate_mean.item()
            ids = self.last_batch.get("hash_ids", {}).get(engram.layer_id)
            if ids is not None:
                flat = engram.table.flat_ids(ids)
                fracs.append(flat.unique().numel() / flat.numel())
        if fracs:
            scalars["engram/unique_rows_frac"] = sum(fracs) / len(fracs)
        return scalars

    def save(self) -> None:
        if self.ckpt is not None:
            self.last_checkpoint = str(
                self.ckpt.save(
                    self.step, self.model, self.optimizers, {"loader": self.loader.state_dict()}
                )
            )

    # ----- the loop -----
    def fit(self) -> dict:
        t, m = self.cfg.training, self.cfg.metrics
        tokens_per_step = (
            t.batch_size * t.grad_accum_steps * self.cfg.data.seq_len * self.dims.dp_degree
        )
        window_start, window_steps, window_wait = time.perf_counter(), 0, self.loader.wait_seconds
        val_loss = None
        while self.step < t.steps:
            values = self.train_step()
            window_steps += 1
            self.metrics.advance()
            if self.step % m.log_freq == 0 or self.step == t.steps:
                elapsed = time.perf_counter() - window_start
                wait = self.loader.wait_seconds - window_wait
                values.update(
                    tps=tokens_per_step * window_steps / elapsed,
                    flops_per_token=self.accounting.flops_per_token,
                    data_wait_pct=100 * wait / elapsed,
                )
                self.metrics.log_train(self.step, values, self.engram_scalars())
                window_start, window_steps, window_wait = (
                    time.perf_counter(),
                    0,
                    self.loader.wait_seconds,
                )
            if self.step % m.eval_freq == 0 or self.step == t.steps:
                val_loss, tokens = self.evaluate()
                self.metrics.log_eval(self.step, val_loss, tokens)
            if self.step % self.cfg.checkpoint.interval == 0 or self.step == t.steps:
                self.save()
        if val_loss is None:  # resumed at the final step
            val_loss, tokens = self.evaluate()
            self.metrics.log_eval(self.step, val_loss, tokens)
        self.metrics.close()
        return {
            "step": self.step,
            "val_loss": val_loss,
            "run_folder": str(self.run_folder),
            "checkpoint": self.last_checkpoint,
        }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    else:
        for i, arg in enumerate(argv):
            if arg.startswith("--config="):
                config_path = arg.split("=", 1)[1]
                del argv[i]
                break
    try:
        cfg = load_config(config_path, argv)
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        log.error("%s: %s", type(err).__name__, err)
        destroy()
        return 2
    try:
        summary = trainer.fit()
    except FloatingPointError as err:
        log.error("%s", err)
        return 3
    finally:
        trainer.loader.close()
        destroy()
    if trainer.rank == 0:
        folder = Path(summary["run_folder"])
        print(
            f"\ndone: step {summary['step']}, held-out loss {summary['val_loss']:.4f}\n"
            f"  logs:        {folder / 'metrics.jsonl'} (TensorBoard: "
            f"{folder / cfg.metrics.save_tb_folder})\n"
            f"  config:      {folder / 'config.toml'}\n"
            f"  checkpoint:  {summary['checkpoint']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
