"""The job configuration: one dataclass tree, TOML job files, ``--section.key=value`` overrides.

Sections follow torchtitan's names (job, model, data, optimizer, lr_scheduler, training,
parallelism, checkpoint, metrics). Each component receives only its own section, never the root.
Every field has a one-line comment; fields with fixed choices are ``Literal`` types, checked when
they are set. ``validate()`` raises ``ValueError`` naming the field and the fix before any work
starts.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class JobConfig:
    dump_folder: str = "outputs/run"  # logs, config.toml and checkpoints go here
    description: str = ""  # free text, kept in config.toml


@dataclass
class ModelConfig:
    family: str = "deepseek_engram"  # a registered model family (models.spec)
    flavor: str = "debug"  # a named size from models.flavors (python -m models.summary FLAVOR)
    vocab_size: int = 0  # embedding rows; 0: the tokenizer's vocab size
    overrides: dict = field(default_factory=dict)  # ModelArgs fields: {"engram.hash.seed": 1}


@dataclass
class DataConfig:
    dataset_path: str = "data_cache/demo"  # a data.prepare output folder
    prepare_if_missing: bool = True  # run data.prepare (rank 0) when the folder has no manifest
    sources: list = field(default_factory=lambda: ["stdlib", "pydoc"])  # data.prepare --sources
    inputs: list = field(default_factory=list)  # user text/JSONL files or folders to add
    tokenizer: str = ""  # "" -> <dataset_path>/tokenizer.model (trained by data.prepare)
    tokenizer_vocab_size: int = 16000  # the sentencepiece BPE data.prepare trains
    seq_len: int = 256  # tokens per packed row
    num_workers: int = 1  # loader processes (0: load in the training process)
    strict: bool = False  # a corrupt shard is an error instead of a skip with a warning
    url_prefix: str = ""  # shards served from a URL webdataset understands; "" -> dataset_path
    # [[data.mixture]] tables: weighted sources (shards, megatron, tokens, text), docs/data.md;
    # empty: dataset_path alone
    mixture: list = field(default_factory=list)
    # text and shards sources' token counts per document (data/doc_index.py), cached across runs;
    # "" -> $ENGRAM_CACHE/doc_index or ~/.cache/engram/doc_index. Share it between nodes.
    index_dir: str = ""


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"  # dense parameters; sparse tables use row-wise Adam
    lr: float = 3e-3  # peak learning rate
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # on matrices only (not norms, biases, embeddings, tables)
    engram_lr_multiplier: float = 5.0  # the paper's table LR multiplier (tables also get WD 0)
    # sparse tables' state per row: adam (2 x Dh floats), adam_row_v (Dh + 1: one second moment
    # per row) or adagrad_row (1: row-wise Adagrad); see pretrain/rowwise_adam.py
    engram_state: Literal["adam", "adam_row_v", "adagrad_row"] = "adam"


@dataclass
class LRSchedulerConfig:
    name: Literal["cosine", "wsd"] = "cosine"  # warmup + cosine, or warmup-stable-decay
    warmup_steps: int = 20  # linear warmup steps
    decay_ratio: float = 0.2  # wsd: fraction of steps spent decaying
    min_lr_ratio: float = 0.1  # the final LR as a fraction of the peak


@dataclass
class TrainingConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # micro-batch per DP rank
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_norm: float = 1.0  # global gradient-norm clip (0: off)
    mixed_precision: Literal["none", "bf16"] = "none"  # bf16: autocast
    seed: int = 0  # model init and data order
    device: str = "auto"  # "auto": cuda when available, else cpu
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass
class ParallelismConfig:
    data_parallel_replicate_degree: int = 1  # DDP replicas (HSDP: replicas of FSDP groups)
    data_parallel_shard_degree: int = -1  # FSDP2 shards; -1: the rest of the world
    tensor_parallel_degree: int = 1  # Megatron --tensor-model-parallel-size
    pipeline_parallel_degree: int = 1  # Megatron --pipeline-model-parallel-size
    expert_parallel_degree: int = 1  # routed experts sharded over this many dp ranks
    context_parallel_degree: int = 1  # reserved for long-context extension (refused today)
    engram_shard_degree: int = 1  # Engram table rows sharded over the dp ranks (dp degree or 1)
    sequence_parallel: bool = False  # with tensor parallelism: shard activations on the sequence
    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    pipeline_stages_per_rank: int = 1  # > 1 with interleaved_1f1b
    pipeline_microbatches: int = 0  # 0: pipeline_parallel_degree * stages per rank
    timeout_seconds: int = 600  # a collective that waits longer fails instead of hanging


@dataclass
class EngramTableConfig:
    # where the Engram tables' rows and their Adam state live: "device" (with the model),
    # "host" (process memory; page-locked on CUDA), "disk" (a file, read through a memory map)
    placement: Literal["device", "host", "disk"] = "device"
    cache_size: str = "10%"  # host/disk: device row cache, in rows, "N%" of rows or bytes "2GiB"
    path: str = ""  # disk: folder of the table files; "" -> <job.dump_folder>/engram_tables
    prefetch: bool = True  # host/disk: stage the next batch's rows while the step computes


@dataclass
class ActivationCheckpointConfig:
    mode: Literal["none", "full"] = "none"  # full: recompute every block in backward


@dataclass
class CompileConfig:
    enable: bool = False  # torch.compile each block (off by default; slow to warm up on CPU)


@dataclass
class CheckpointConfig:
    enable: bool = True  # save and resume DCP checkpoints
    folder: str = "checkpoints"  # inside job.dump_folder
    interval: int = 50  # steps between saves (the last step is always saved)
    keep_last: int = 3  # complete checkpoints kept
    load: bool = True  # resume from the newest complete checkpoint in the folder
    # a DCP checkpoint whose model weights start the job when there is nothing to resume (for
    # example `python -m launch.convert hf-to-dcp` output); "" = initialise afresh
    initial_load_path: str = ""
    # with initial_load_path: load the model only (true), or the optimizer states too (false);
    # the LR schedule and data state start afresh either way
    initial_load_model_only: bool = True
    # "async": write in a background thread from a host copy while training goes on
    async_mode: Literal["disabled", "async"] = "disabled"


@dataclass
class MetricsConfig:
    log_freq: int = 10  # steps between console/TensorBoard/jsonl records
    enable_tensorboard: bool = True  # write TensorBoard scalars
    save_tb_folder: str = "tb"  # inside job.dump_folder
    eval_freq: int = 100  # steps between held-out evaluations
    eval_batches: int = 16  # validation batches per evaluation
    peak_tflops: float = 0.0  # 0: a per-device default (see pretrain.metrics)
    progress_bar: bool = True  # tqdm on rank 0 (only on a terminal)


@dataclass
class DownstreamConfig:
    """Downstream benchmarks during training: olmo-eval tasks scored by the model being trained
    (pretrain/downstream/, docs/evaluation.md; needs the [eval] extra)."""

    tasks: str = ""  # olmo-eval labels and suites (small, paper), comma-separated; "": off
    interval: int = 0  # steps between evaluations (and after the last step); 0: off
    max_examples: int = 0  # questions per task, a seeded subset drawn before tokenising; 0: all
    seed: int = 0  # which subset
    batch_tokens: int = 0  # tokens per forward (rows x padded length); 0: batch_size x seq_len
    cache_dir: str = ""  # tokenised requests; "" -> $ENGRAM_CACHE/downstream or ~/.cache/engram


@dataclass
class FaultToleranceConfig:
    """Replica groups that drop out and rejoin while the others train on (torchft; torchtitan's
    key names). Each replica group is one copy of the whole layout; docs/fault_tolerance.md."""

    enable: bool = False
    replica_id: int = 0  # this replica group, 0 .. group_size - 1 (one torchrun per group)
    group_size: int = 0  # replica groups in the job (each reads its own share of every step)
    min_replica_size: int = 1  # a step commits only with at least this many replica groups
    # the torchft lighthouse, "http://host:29510"; "" -> $TORCHFT_LIGHTHOUSE
    lighthouse: str = ""
    connect_timeout_s: int = 10  # an unreachable lighthouse is an error after this long
    timeout_s: int = 60  # quorum, commit vote and a recovering replica's state transfer
    # cross-replica collectives: a dead peer fails the step (not committed) after this long
    process_group_timeout_ms: int = 10000
    # how a recovering group receives its peer's state: "pg" (over the replica process group,
    # in place), "http", or "auto" (pg, but http on a GPU with host or disk tables)
    transport: Literal["auto", "pg", "http"] = "auto"
    # steps in a row that may fail to commit before this group stops (0: wait for ever)
    max_failed_steps: int = 0
    # at the end, each rank writes the sha256 of its whole training state to
    # replica_<id>/state_digest_rank<r>.json (replica groups that agree hold the same bits)
    state_digest: bool = False


@dataclass
class Float8LinearQuantizeConfig:
    """``[quantize.linear.float8]``: torchao's float8 training for the dense linears (torchtitan's
    keys); models/quantize.py says which layers convert."""

    enable: bool = False  # attention projections and dense/shared-expert MLPs compute in FP8
    # tensorwise: one scale per tensor; rowwise: per row, power-of-two scales; rowwise_with_gw_hp:
    # rowwise with the weight gradient in high precision
    recipe_name: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = "rowwise"
    filter_fqns: list = field(
        default_factory=list
    )  # module names containing these stay as they are
    # "auto": emulated where no FP8 tensor cores exist (CPU, pre-Hopper); true/false forces it
    emulate: Literal["auto", True, False] = "auto"
    # tensorwise: FSDP2 all-gathers the weights in float8 (NCCL only; gloo cannot send float8)
    enable_fsdp_float8_all_gather: bool = False
    # with the float8 all-gather: one amax all-reduce for every weight after the optimizer step
    precompute_float8_dynamic_scale_for_fsdp: bool = False


@dataclass
class QuantizeLinearConfig:
    float8: Float8LinearQuantizeConfig = field(default_factory=Float8LinearQuantizeConfig)


@dataclass
class GroupedMMQuantizeConfig:
    """``[quantize.grouped_mm]``: the routed experts' grouped GEMMs (torchao's MoE training)."""

    enable: bool = False  # on a GPU with FP8 tensor cores; on CPU the experts stay as they are
    recipe_name: Literal["rowwise", "mxfp8"] = "rowwise"  # rowwise: Hopper; mxfp8: Blackwell


@dataclass
class QuantizeConfig:
    """``[quantize]``: low-precision training through torchao (the ``[fp8]`` extra)."""

    # the Engram layer's key/value GEMM in FP8 too, with the linear recipe (the rows' gradient,
    # which the row-wise optimizer reads, stays in high precision)
    engram: bool = False
    linear: QuantizeLinearConfig = field(default_factory=QuantizeLinearConfig)
    grouped_mm: GroupedMMQuantizeConfig = field(default_factory=GroupedMMQuantizeConfig)


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    activation_checkpoint: ActivationCheckpointConfig = field(
        default_factory=ActivationCheckpointConfig
    )
    compile: CompileConfig = field(default_factory=CompileConfig)
    engram_table: EngramTableConfig = field(default_factory=EngramTableConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)

    def validate(self) -> None:
        from models.spec import get_model_spec

        get_model_spec(self.model.family)  # a ValueError names the registered families
        t, o, s, c, m, d = (
            self.training,
            self.optimizer,
            self.lr_scheduler,
            self.checkpoint,
            self.metrics,
            self.data,
        )
        checks = [
            (t.steps > 0, f"training.steps={t.steps}: must be > 0"),
            (t.batch_size > 0, f"training.batch_size={t.batch_size}: must be > 0"),
            (
                t.grad_accum_steps > 0,
                f"training.grad_accum_steps={t.grad_accum_steps}: must be > 0",
            ),
            (
                t.max_norm >= 0,
                f"training.max_norm={t.max_norm}: must be >= 0 (0 disables clipping)",
            ),
            (o.lr > 0, f"optimizer.lr={o.lr}: must be > 0"),
            (
                len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
                f"optimizer.betas={o.betas}: give two values in [0, 1)",
            ),
            (o.engram_lr_multiplier > 0, "optimizer.engram_lr_multiplier must be > 0"),
            (
                0 <= s.warmup_steps < t.steps,
                f"lr_scheduler.warmup_steps={s.warmup_steps}: must be in [0, "
                f"training.steps={t.steps})",
            ),
            (
                0 < s.decay_ratio <= 1,
                f"lr_scheduler.decay_ratio={s.decay_ratio}: must be in (0, 1]",
            ),
            (
                0 <= s.min_lr_ratio <= 1,
                f"lr_scheduler.min_lr_ratio={s.min_lr_ratio}: must be in [0, 1]",
            ),
            (c.interval > 0, f"checkpoint.interval={c.interval}: must be > 0"),
            (c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last}: keep at least 1 checkpoint"),
            (m.log_freq > 0, f"metrics.log_freq={m.log_freq}: must be > 0"),
            (m.eval_freq > 0, f"metrics.eval_freq={m.eval_freq}: must be > 0"),
            (d.seq_len > 1, f"data.seq_len={d.seq_len}: must be > 1"),
            (d.num_workers >= 0, f"data.num_workers={d.num_workers}: must be >= 0"),
            (
                self.engram_table.placement == "device" or c.async_mode == "disabled",
                f"engram_table.placement={self.engram_table.placement!r} with "
                "checkpoint.async_mode='async': an asynchronous save stages the whole table in "
                "host memory; use checkpoint.async_mode='disabled' (offloaded tables are "
                "streamed to the checkpoint block by block)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.fault_tolerance.enable:
            self.fault_tolerance_checks()
        self.downstream_checks()
        self.quantize_checks()
        if d.mixture:
            from data.mixture import parse_mixture

            parse_mixture(d.mixture)

    def downstream_checks(self) -> None:
        ds, p = self.downstream, self.parallelism
        checks = [
            (
                bool(ds.tasks) == (ds.interval > 0),
                f"downstream.tasks={ds.tasks!r} with downstream.interval={ds.interval}: set both "
                "(tasks to evaluate, and every how many steps) or neither",
            ),
            (ds.interval >= 0, f"downstream.interval={ds.interval}: must be >= 0"),
            (ds.max_examples >= 0, f"downstream.max_examples={ds.max_examples}: must be >= 0"),
            (ds.batch_tokens >= 0, f"downstream.batch_tokens={ds.batch_tokens}: must be >= 0"),
            (
                not ds.tasks or p.context_parallel_degree == 1,
                "downstream.tasks with parallelism.context_parallel_degree > 1: scoring runs "
                "whole rows; evaluate the checkpoint with python -m launch.evaluate --tasks",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def quantize_checks(self) -> None:
        q, f8 = self.quantize, self.quantize.linear.float8
        checks = [
            (
                not f8.enable_fsdp_float8_all_gather or f8.recipe_name == "tensorwise",
                "quantize.linear.float8.enable_fsdp_float8_all_gather needs recipe_name="
                f"'tensorwise' (got {f8.recipe_name!r}): torchao all-gathers float8 weights with "
                "one scale per tensor only",
            ),
            (
                not f8.enable_fsdp_float8_all_gather or self.training.device != "cpu",
                "quantize.linear.float8.enable_fsdp_float8_all_gather with training.device='cpu': "
                "gloo cannot send float8 tensors; leave it off on CPU (the high-precision "
                "all-gather computes the same FP8 products)",
            ),
            (
                not f8.precompute_float8_dynamic_scale_for_fsdp or f8.enable_fsdp_float8_all_gather,
                "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp needs "
                "enable_fsdp_float8_all_gather=true (it precomputes that all-gather's scales)",
            ),
            (
                not q.grouped_mm.enable or f8.enable,
                "quantize.grouped_mm.enable needs quantize.linear.float8.enable=true: the "
                "experts take part in the model's FP8 recipe",
            ),
            (
                not q.engram or f8.enable,
                "quantize.engram=true needs quantize.linear.float8.enable=true: the Engram GEMM "
                "takes the linear recipe",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def fault_tolerance_checks(self) -> None:
        f = self.fault_tolerance
        checks = [
            (
                f.group_size >= 1,
                f"fault_tolerance.group_size={f.group_size}: set the number of replica groups "
                "(launch/run_local.sh sets it from FT_REPLICAS)",
            ),
            (
                0 <= f.replica_id < max(f.group_size, 1),
                f"fault_tolerance.replica_id={f.replica_id}: must be in [0, group_size="
                f"{f.group_size})",
            ),
            (
                1 <= f.min_replica_size <= f.group_size,
                f"fault_tolerance.min_replica_size={f.min_replica_size}: must be in [1, "
                f"group_size={f.group_size}]",
            ),
            (
                bool(self.data.mixture),
                "fault_tolerance.enable needs data.mixture: a rejoining replica takes the global "
                "data schedule from its peer, and only a mixture's position is global; describe "
                "the folder as one source ([[data.mixture]] format = 'shards')",
            ),
            (
                self.checkpoint.async_mode == "disabled",
                "fault_tolerance.enable with checkpoint.async_mode='async': the replica that "
                "saves changes from step to step; use checkpoint.async_mode='disabled'",
            ),
            (
                min(f.connect_timeout_s, f.timeout_s, f.process_group_timeout_ms) > 0,
                "fault_tolerance timeouts must be > 0",
            ),
            (
                f.max_failed_steps >= 0,
                f"fault_tolerance.max_failed_steps={f.max_failed_steps}: must be >= 0 (0: no "
                "limit)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
# keys that were renamed: old -> (new, why)
RENAMED = {
    "parallelism.engram_table_parallel_degree": (
        "parallelism.engram_shard_degree",
        "'etp' / Engram-table parallelism was confused with expert tensor parallelism",
    ),
}


def _coerce(section: str, key: str, value, target):
    hints = typing.get_type_hints(type(target))
    if f"{section}.{key}" in RENAMED:
        new, why = RENAMED[f"{section}.{key}"]
        raise ValueError(f"{section}.{key} was renamed to {new} ({why}); use {new}={value}")
    if key not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(target))
        raise ValueError(f"unknown config key {section}.{key}; known keys of [{section}]: {known}")
    kind = hints[key]
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        if isinstance(value, str) and value not in allowed:
            value = _parse_literal(value)  # "true" from a command line
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            choices = " or ".join(repr(a) for a in allowed)
            raise ValueError(f"{section}.{key}={value!r}: use {choices}")
        return value
    if isinstance(value, str) and kind is not str:
        value = _parse_literal(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    origin = typing.get_origin(kind) or kind
    if origin in (int, float, bool, str, list, dict) and not isinstance(value, origin):
        raise ValueError(f"{section}.{key}={value!r}: expected {origin.__name__}")
    if origin is int and isinstance(value, bool):
        raise ValueError(f"{section}.{key}={value!r}: expected int")
    return value


def _parse_literal(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply(config: Config, section: str, key: str, value) -> None:
    """Set ``[section] key = value``; a dotted key reaches a sub-table (``linear.float8.enable``
    of ``[quantize]``), and a table value sets each of its keys."""
    if section not in SECTIONS:
        raise ValueError(f"unknown config section [{section}]; sections: {', '.join(SECTIONS)}")
    target = getattr(config, section)
    if section == "model" and key.startswith("overrides."):
        target.overrides[key.removeprefix("overrides.")] = (
            _parse_literal(value) if isinstance(value, str) else value
        )
        return
    *path, name = key.split(".")
    table = section
    for part in path:  # [quantize.linear.float8]
        inner = getattr(target, part, None)
        if not dataclasses.is_dataclass(inner):
            known = ", ".join(f.name for f in dataclasses.fields(target))
            raise ValueError(f"unknown config table [{table}.{part}]; keys of [{table}]: {known}")
        target, table = inner, f"{table}.{part}"
    if isinstance(value, dict) and dataclasses.is_dataclass(getattr(target, name, None)):
        for inner_key, inner_value in value.items():
            apply(config, section, f"{key}.{inner_key}", inner_value)
        return
    setattr(target, name, _coerce(table, name, value, target))


def parse_args(argv: list[str]) -> Config:
    """``--config FILE`` (or ``--config=FILE``) plus ``--section.key=value`` overrides."""
    argv, path = list(argv), None
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a TOML file (see pretrain/configs/)")
            path = argv[i + 1]
            del argv[i : i + 2]
            break
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            del argv[i]
            break
    return load_config(path, argv)


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file, then ``--section.key=value`` overrides."""
    config = Config()
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {path} does not exist (see pretrain/configs/)")
        for section, values in tomllib.loads(file.read_text()).items():
            if not isinstance(values, dict):
                raise ValueError(f"{path}: top-level key {section!r} must be a [section] table")
            for key, value in values.items():
                if section == "model" and key == "overrides":
                    config.model.overrides.update(value)
                else:
                    apply(config, section, key, value)
    for item in _split_overrides(list(overrides)):
        dotted, value = item
        section, _, key = dotted.partition(".")
        if not key:
            raise ValueError(f"override --{dotted}: write --section.key=value")
        apply(config, section, key, value)
    config.validate()
    return config


def _split_overrides(args: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides are --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:
            raise ValueError(f"override {arg} has no value")
        pairs.append((key, value))
    return pairs


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(config: Config) -> str:
    """The resolved config as TOML (written to the run folder as ``config.toml``)."""
    lines = []

    def table(name: str, section) -> None:
        lines.append(f"[{name}]")
        inner = []
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                inner.append((f"{name}.{f.name}", value))
            else:
                lines.append(f"{f.name} = {_toml_value(_plain(value))}")
        lines.append("")
        for inner_name, inner_section in inner:
            table(inner_name, inner_section)

    for section in SECTIONS:
        table(section, getattr(config, section))
    return "\n".join(lines)


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
