"""Shared machinery of the distributed parity tests: one tiny model, one batch stream, one training
loop through the real step (``pretrain.step``), and one comparison.

Every layout starts from the single-process initial weights (saved with DCP and resharded onto the
layout), trains ``STEPS`` steps on its data-parallel share of the same batches, and reports, per
rank: the data-parallel mean loss, the global gradient norm, the full gradient of every parameter
it holds (gathered from shards) at every step, and the final full state. ``check_parity`` compares
every rank, replicas included, against the single-process run.

Errors are Frobenius norms of the difference relative to the reference tensor (gradients: at
least 1% of the global gradient norm; parameters: at least one Adam step), and tolerances are about
10x the largest float32 rounding measured over every layout of the suite. ``PARITY_MEASURE=FILE``
records the errors instead of asserting them (one JSON line per test).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from data.batch import Batch, EngramInputs, context_shard, plan_lookups
from models.parallelize import parallelize_deepseek_engram
from models.tables.offload import OffloadedTables, place_engram_tables
from models.transformer import Transformer
from parallel.dims import ParallelDims
from parallel.plan import ParallelPlan
from pretrain.config import OptimizerConfig, ParallelismConfig
from pretrain.optimizer import Optimizers
from pretrain.pipeline_runner import PipelineRunner
from pretrain.step import StepModel, forward_backward, lookup_planners, optimizer_step
from tests.test_models import tiny

STEPS = 3
ROWS, SEQ = 4, 16
LR = 1e-2
MAX_NORM = 0.5  # small enough that clipping is active: a wrong global norm changes the update
# about 10x the largest error measured over every layout of the suite (docs/STATUS.md); "later"
# kinds are steps 2 and 3, whose inputs already carry the previous updates' rounding, which the
# Engram gate's signed sqrt and Adam's normalisation amplify
TOLERANCE = {
    "loss": 2e-6,
    "grad_norm": 1e-6,
    "grad_norm_later": 1e-3,
    "grad": 5e-6,
    "grad_later": 5e-2,
    "param": 1.5e-2,
}
if os.environ.get("PARITY_MEASURE"):  # report the errors instead of asserting them
    TOLERANCE = dict.fromkeys(TOLERANCE, float("inf"))


def model_args(sparse: bool = True, attention: str = "mla", vocab: int = 97, layers: int = 2):
    args = tiny(attention, hc=2)
    args.engram.sparse_grad = sparse
    args.vocab_size = vocab  # batches draw ids below 97
    args.num_layers = layers
    return args


def initial_model(args) -> Transformer:
    model = Transformer(args)
    torch.manual_seed(0)
    model.init_weights()
    return model


def save_initial(args, path) -> str:
    dcp.save(initial_model(args).state_dict(), checkpoint_id=str(path))
    return str(path)


def load_initial(inner, ckpt: str) -> None:
    """The single-process weights, resharded by DCP onto any layout."""
    state = get_model_state_dict(inner)
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(inner, state)


def make_batch(
    step: int, seq: int = SEQ, doc_starts: tuple[int, ...] | None = None, vocab: int = 97
) -> Batch:
    """The full batch of step ``step`` (documents starting at ``doc_starts`` in every row, by
    default two halves; token ids below ``vocab``; Engram layer 0's hash ids)."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, vocab, (ROWS, seq + 1), generator=g)
    starts = torch.zeros(seq, dtype=torch.bool)
    starts[list(doc_starts or (0, seq // 2))] = True
    doc_ids = (starts.long().cumsum(0) - 1).expand(ROWS, seq).clone()
    index = torch.arange(seq)
    positions = (index - torch.cummax(torch.where(starts, index, 0), 0).values).expand(ROWS, seq)
    hash_ids = torch.randint(0, 50, (ROWS, seq, 4), generator=g)
    return Batch(tokens[:, :-1], tokens[:, 1:], positions, doc_ids, {0: EngramInputs(hash_ids)})


@dataclass
class Trace:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per step, full tensors
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # final, full tensors
    # lookups of offloaded row shards routed by their prefetch (None: this rank holds none)
    reused_routes: int | None = None


def full_grads(inner) -> dict[str, torch.Tensor]:
    """Every gradient this rank holds, as the full tensor (FSDP/TP DTensors and row shards of
    experts and tables gathered; sparse gradients densified). Collective: call on every rank."""
    row_sharded = {
        f"{name}.{param}": module
        for name, module in inner.named_modules()
        if hasattr(module, "to_global")
        for param in module.sharded_params
    }
    grads = {}
    for name, param in inner.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            grad = grad.coalesce().to_dense()
        if name in row_sharded:
            grad = row_sharded[name].to_global(grad)
        if hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        grads[name] = grad.detach().clone()
    return grads


def full_state(inner) -> dict[str, torch.Tensor]:
    state = {}
    for name, value in inner.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[name] = value.detach().clone()
    return state


def train(
    sm: StepModel,
    opts: Optimizers,
    rows: slice,
    plan_chunks: int = 1,
    accum: int = 1,
    steps: int = STEPS,
    prefetch: bool = False,
    cp: tuple[int, int] = (1, 0),
    make=make_batch,
) -> Trace:
    """``steps`` steps of the real step on ``rows`` of every batch, in ``accum`` accumulated
    microbatches; lookups planned by the tables' own planners, as the loader does.
    ``prefetch``: offloaded tables prefetch the next microbatch's rows, as the trainer does.
    ``cp``: (degree, rank): take this context-parallel rank's share of every row, as the loader
    does. ``make(step)``: the full batch of a step."""
    trace = Trace()
    planners = lookup_planners(sm.inner)
    tables = OffloadedTables(sm.inner)

    def inspect(grad_norm: torch.Tensor) -> None:
        trace.grad_norms.append(grad_norm.item())
        trace.grads.append(full_grads(sm.inner))

    per = (rows.stop - rows.start) // accum
    batches = [
        plan_lookups(
            context_shard(
                make(step).select_rows(
                    slice(rows.start + micro * per, rows.start + (micro + 1) * per)
                ),
                *cp,
            ),
            planners,
            plan_chunks,
        )
        for step in range(steps)
        for micro in range(accum)
    ]
    loss = 0.0
    for i, batch in enumerate(batches):
        if prefetch and tables and i + 1 < len(batches):
            tables.prefetch(batches[i + 1])
        last = (i + 1) % accum == 0
        out = forward_backward(sm, batch, scale=1 / accum, sync=last)
        loss = loss + out.ce / accum
        if last:
            optimizer_step(sm, opts, MAX_NORM, inspect)
            trace.losses.append(loss)
            loss = 0.0
    trace.state = full_state(sm.inner)
    shards = [t for t in tables.tables.values() if hasattr(t, "reused_routes")]
    if shards:
        trace.reused_routes = sum(t.reused_routes for t in shards)
    return trace


def reference(args, make=make_batch, convert=None, steps: int = STEPS, accum: int = 1) -> Trace:
    """The single-process run; ``convert(model)``: a model converter (FP8) applied first;
    ``accum``: the batch in that many micro-batches."""
    model = initial_model(args)
    if convert is not None:
        convert(model)
    sm = StepModel(model, model, ParallelPlan())
    opts = Optimizers(model, OptimizerConfig(lr=LR))
    trace = train(sm, opts, slice(0, ROWS), accum=accum, make=make, steps=steps)
    trace.losses = [x.item() for x in trace.losses]
    return trace


def run_layout(
    rank: int,
    world: int,
    layout: dict,
    args,
    ckpt: str,
    accum: int = 1,
    steps: int = STEPS,
    tables: dict | None = None,
    make=make_batch,
    convert=None,
) -> Trace:
    """One rank of ``layout`` (``ParallelismConfig`` fields): parallelise, load the initial
    weights, train on this rank's data-parallel rows (in ``accum`` microbatches); losses are the
    data-parallel mean. ``tables``: offload the Engram tables (``placement``, ``folder``,
    ``cache_size``, ``prefetch``), as ``[engram_table]`` does. ``convert(model)``: a model
    converter, on the meta device before parallelisation, as the trainer applies it."""
    cfg = ParallelismConfig(**layout)
    dims = ParallelDims.from_config(cfg, world)
    mesh = dims.build_mesh("cpu")
    place, prefetch = None, False
    if tables is not None:
        lookups = ROWS // dims.dp_degree * SEQ * args.engram.num_heads
        place = functools.partial(
            place_engram_tables,
            placement=tables["placement"],
            cache_size=tables.get("cache_size", "10%"),
            device="cpu",
            folder=tables.get("folder"),
            min_cache_rows=(accum + 1) * lookups,
        )
        prefetch = tables.get("prefetch", True)
    with torch.device("meta"):
        model = Transformer(args)
    if convert is not None:
        convert(model)
    model, inner, plan = parallelize_deepseek_engram(
        model,
        dims,
        mesh,
        "cpu",
        0,
        stages_per_rank=cfg.pipeline_stages_per_rank,
        sequence_parallel=cfg.sequence_parallel,
        place_tables=place,
    )
    load_initial(inner, ckpt)
    pipeline = None
    if dims.pp > 1:
        pipeline = PipelineRunner(plan, cfg, torch.device("cpu"), 1, inner)
    sm = StepModel(model, inner, plan, pipeline)
    per = ROWS // dims.dp_degree
    dp_rank = dims.dp_rank(rank)
    trace = train(
        sm,
        Optimizers(model, OptimizerConfig(lr=LR)),
        slice(per * dp_rank, per * (dp_rank + 1)),
        plan_chunks=pipeline.microbatches if pipeline is not None else 1,
        accum=accum,
        steps=steps,
        prefetch=prefetch,
        cp=(dims.cp, dims.cp_rank(rank)),
        make=make,
    )
    losses = []
    for loss in trace.losses:  # the mean over data-parallel rows and context-parallel chunks
        total = loss.detach().clone().double()
        dist.all_reduce(total, group=plan.dp_group)
        if plan.cp_group is not None:
            dist.all_reduce(total, group=plan.cp_group)
        losses.append(total.item() / dims.batch_degree)
    trace.losses = losses
    return trace


def _error(got: torch.Tensor, want: torch.Tensor, floor: float) -> float:
    """``|got - want| / max(|want|, floor)`` in the Frobenius norm. The floor keeps tensors whose
    values are rounding noise themselves (the mHC ``static_res`` gradients through Sinkhorn are
    ~1e-10) from dominating."""
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = torch.linalg.vector_norm(got.double() - want.double()).item()
    return diff / max(torch.linalg.vector_norm(want.double()).item(), floor)


def check_parity(want: Trace, results: dict[int, Trace]) -> dict[str, float]:
    """Every rank against the single-process run; returns the largest error of each kind.

    Pipeline ranks hold only their stages' parameters: together they must cover the model.
    """
    worst: dict = dict.fromkeys(TOLERANCE, 0.0)
    seen: set[str] = set()

    def record(kind: str, err: float, where: str) -> None:
        if err >= worst[kind]:
            worst[kind], worst[f"{kind}_at"] = err, where
        limit = TOLERANCE[kind]
        assert err <= limit, f"{where}: {kind} error {err:.3g} > {limit}"

    for rank, got in results.items():
        for step in range(STEPS):
            where = f"rank {rank}, step {step + 1}"
            record("loss", abs(got.losses[step] / want.losses[step] - 1), where)
            norm_err = abs(got.grad_norms[step] / want.grad_norms[step] - 1)
            record("grad_norm" if step == 0 else "grad_norm_later", norm_err, where)
            floor = 1e-2 * want.grad_norms[step]  # 1% of the step's global gradient norm
            for name, grad in got.grads[step].items():
                assert name in want.grads[step], f"{where}: unexpected gradient {name}"
                kind = "grad" if step == 0 else "grad_later"
                record(kind, _error(grad, want.grads[step][name], floor), f"{where}, {name}")
            seen |= set(got.grads[step])
        for name, value in got.state.items():
            floor = LR * value.numel() ** 0.5  # the size of one Adam step of every element
            record("param", _error(value, want.state[name], floor), f"rank {rank}, {name}")
    missing = set().union(*want.grads) - seen
    assert not missing, f"no rank has the gradients of {sorted(missing)}"
    if os.environ.get("PARITY_MEASURE"):
        with open(os.environ["PARITY_MEASURE"], "a") as log:
            log.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST"), **worst}) + "\n")
    return worst
