"""``parallelize_deepseek_engram``: applies the parallel plan to the model family, whose modules
are plain PyTorch.

Order (build on meta, shard, then initialise): the model arrives on the meta device; Engram
tables and routed experts are swapped for their shards and FSDP shards the rest there; then the
model is materialised and initialised (inits are sharding-independent); DDP wraps a materialised
model.

Parameters DDP does not manage (sparse replicated tables, row-sharded tables, expert shards)
get their gradient synchronisation from ``ParallelPlan.sync_grads`` after backward, and their
global norm from ``ParallelPlan.sharded_groups``.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from models.moe import GroupedExperts
from models.parallel_plans import sequence_local_params, split_pipeline, tensor_parallel_plan
from models.tables.table import init_table_rows
from parallel.context_parallel import ContextParallelSequence
from parallel.data_parallel import apply_ddp, apply_fsdp
from parallel.dims import ParallelDims
from parallel.distributed import cpu_group_for
from parallel.engram_table_parallel import ShardedEngramTable
from parallel.expert_parallel import AllToAllDispatcher
from parallel.plan import GradSyncRule, ParallelPlan
from parallel.sharding import register_row_sharding
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.wrappers import apply_block_wrappers


def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def parallelize_deepseek_engram(
    model: nn.Module,
    dims: ParallelDims,
    mesh,
    device,
    seed: int,
    activation_checkpoint: str = "none",
    compile_blocks: bool = False,
    stages_per_rank: int = 1,
    sequence_parallel: bool = False,
    dry_run: bool = False,
    mixed_precision: str = "none",
    materialize_fn=None,
    place_tables=None,
):
    """Returns ``(model to call, the plain Transformer underneath, ParallelPlan)``.

    Order: pipeline split, TP, EP, Engram tables, activation checkpointing / compile, then data
    parallelism (FSDP, DDP, or an explicit gradient all-reduce when DDP cannot wrap the model).
    ``dry_run``: apply the plan on the meta device (with a fake process group) and stop before
    materialising, to count what a rank would hold. ``materialize_fn(model)`` replaces
    ``materialize`` (the simulator makes fake tensors instead). ``mixed_precision="bf16"``: FSDP
    gathers parameters in bf16 and reduces gradients in float32 (with autocast in the step).
    ``place_tables(model)`` moves the Engram tables this rank holds (whole, or its row shards)
    to their tier (``models.tables.offload.place_engram_tables``), after the pipeline split and
    the table sharding.
    """
    plan = ParallelPlan()
    place_tables = place_tables or (lambda model: None)
    if materialize_fn is None:
        materialize_fn = functools.partial(materialize, device=device, seed=seed)
    if dims.world_size == 1:
        place_tables(model)
        apply_block_wrappers(model.layers, activation_checkpoint, compile_blocks)
        return (model if dry_run else materialize_fn(model)), model, plan
    if dims.pp > 1:
        pp_mesh = mesh["pp"]
        model, plan.stages, plan.stage_ids, plan.num_stages = split_pipeline(
            model, pp_mesh.get_local_rank(), dims.pp, stages_per_rank
        )
        plan.pp_group = pp_mesh.get_group()
        plan.pp_cpu_group = cpu_group_for(plan.pp_group)
    plan.dp_group = dims.dp_group(mesh)
    plan.cp_group = dims.cp_group(mesh)
    plan.vocab_parallel = dims.tp > 1 and dims.pp == 1
    # gradients are averaged over every rank holding different tokens: data x context parallel
    batch_group = dims.batch_group(mesh) or dist.group.WORLD
    if dims.cp > 1:
        apply_context_parallel(
            model, ContextParallelSequence(plan.cp_group, dims.cp, mesh["cp"].get_local_rank())
        )
        plan.token_groups.append(plan.cp_group)
    if dims.tp > 1:
        apply_tensor_parallel(
            model, mesh["tp"], tensor_parallel_plan(model, dims.pp == 1, sequence_parallel)
        )
    sharded = _apply_sharded_tables_and_experts(model, dims, device, batch_group, place_tables)
    apply_block_wrappers(model.layers, activation_checkpoint, compile_blocks)
    fsdp = dims.dp_shard * dims.cp > 1
    if fsdp:
        _check_no_replicated_sparse(model)
        ignored = {p for modules, *_ in sharded for module in modules for p in module.parameters()}
        apply_fsdp(
            model,
            dims.fsdp_mesh(mesh),
            list(model.layers.values()),
            ignored_params=ignored,
            extra_units=[
                m
                for m in (model.tok_embeddings, model.merge, model.norm, model.output)
                if m is not None and dims.pp > 1
            ],
            param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
        )
    if dry_run:
        return model, model, plan
    materialize_fn(model)  # replaces plain Parameters: collect them only now
    if sequence_parallel:
        plan.rules.append(GradSyncRule(sequence_local_params(model), mesh["tp"].get_group(), 1))
        plan.token_groups.append(mesh["tp"].get_group())
    for modules, cpu_group, group, divisor in sharded:
        params = [p for module in modules for p in module.parameters()]
        plan.sharded_groups.append((params, cpu_group))
        if divisor is not None:
            plan.rules.append(GradSyncRule(params, group, divisor))
    if fsdp or dims.dp_degree == 1:  # FSDP already syncs; no replicas otherwise
        return model, model, plan
    replicated_sparse = sparse_grad_params(model)
    dp_group = plan.dp_group or dist.group.WORLD
    if replicated_sparse:
        plan.rules.append(GradSyncRule(replicated_sparse, dp_group, dims.dp_degree))
    managed = {id(p) for rule in plan.rules for p in rule.params}
    managed |= {id(p) for params, _ in plan.sharded_groups for p in params}
    if dims.tp > 1 or dims.pp > 1:
        # DDP cannot wrap DTensor parameters or pipeline stages: average the rest explicitly
        rest = [p for p in model.parameters() if id(p) not in managed]
        plan.rules.append(GradSyncRule(rest, dp_group, dims.dp_degree))
        return model, model, plan
    names = [n for n, p in model.named_parameters() if id(p) in managed]
    return apply_ddp(model, mesh, names), model, plan


def _apply_sharded_tables_and_experts(
    model, dims: ParallelDims, device, batch_group, place
) -> list:
    """Expert and Engram-table sharding, then the tables' placement (``place(model)``); returns
    ``(modules, norm group, sync group, divisor)``. Both average their gradients over the ranks
    holding different tokens (``batch_group``: data x context parallel)."""
    sharded = []
    if dims.ep > 1:
        ep_mesh = dims.build_ep_mesh(torch.device(device).type)
        ep_group = ep_mesh["ep"].get_group()
        experts = apply_expert_parallel(model, ep_group, ep_mesh["ep"].get_local_rank())
        # the replicas of an expert shard: the other ep groups (data and context parallel)
        sync = ep_mesh["ep_replicate"].get_group() if dims.batch_degree > dims.ep else None
        sharded.append((experts, cpu_group_for(ep_group), sync, dims.batch_degree))
    if dims.engram_shard > 1:
        cpu_group = cpu_group_for(batch_group)
        apply_engram_table_parallel(model, batch_group, cpu_group, dims.batch_degree)
        place(model)
        tables = [e.table for e in model.engram_layers()]
        sharded.append((tables, cpu_group, None, None))  # owners already hold the scaled sum
    else:
        place(model)
    return sharded


def apply_context_parallel(model: nn.Module, sequence) -> None:
    """Swap the model's sequence seams (the mask and attention's keys and values, the Engram
    ShortConv's halo, the MoE balance statistics) for ``sequence``, this rank's zigzag share."""
    model.sequence = sequence
    for engram in model.engram_layers():
        if hasattr(engram, "short_conv"):
            engram.short_conv.sequence = sequence
    for moe in model.moe_layers():
        moe.sequence = sequence


def _check_no_replicated_sparse(model) -> None:
    if sparse_grad_params(model):
        raise ValueError(
            "FSDP (parallelism.data_parallel_shard_degree > 1) cannot shard sparse gradients of "
            "replicated Engram tables: set parallelism.engram_shard_degree to the "
            "data-parallel degree, or --model.overrides.engram.sparse_grad=false"
        )


def sparse_grad_params(model: nn.Module) -> list[nn.Parameter]:
    """Replicated Engram tables with sparse gradients (DDP only buckets dense gradients)."""
    return [
        e.table.weight
        for e in model.engram_layers()
        if e.table.sparse and not isinstance(e.table, ShardedEngramTable)
    ]


def apply_engram_table_parallel(model: nn.Module, group, cpu_group, dp_degree: int):
    """Swap every Engram table for its row shard over ``group`` (before materialisation).

    ``dp_degree``: how many data-parallel replicas feed the tables; the owners' gradients are scaled
    by its inverse so an update equals the data-parallel average. Returns the shard modules.
    """
    modules = []
    for engram in model.engram_layers():
        table = engram.table
        engram.table = ShardedEngramTable(
            table.table_sizes,
            table.offsets_np,
            table.head_dim,
            group,
            cpu_group,
            1.0 / dp_degree,
            init_table_rows,
            device=table.weight.device,
        )
        modules.append(engram.table)
    return modules


def apply_expert_parallel(model: nn.Module, ep_group, ep_rank: int) -> list[nn.Module]:
    """Keep ``ceil(E / ep)`` consecutive expert slots per rank (padding on the last ranks when
    ``ep`` does not divide E) and route tokens with all-to-all."""
    modules = []
    for moe in model.moe_layers():
        args, old = moe.args, moe.experts
        dispatcher = AllToAllDispatcher(ep_group, args.num_routed_experts)
        local = dispatcher.local_experts
        moe.experts = GroupedExperts(
            old.w1.shape[1],
            old.w1.shape[2],
            local,
            args.use_grouped_mm,
            first_expert=ep_rank * local,
        ).to(old.w1.device)
        if old.reconvert is not None:  # FP8 grouped GEMMs: the shard converts as the whole did
            old.reconvert(moe.experts)
        register_row_sharding(
            moe.experts,
            ["w1", "w2", "w3"],
            ep_group,
            args.num_routed_experts,
            ep_rank * local,
            real_rows=dispatcher.real_experts(ep_rank, args.num_routed_experts),
        )
        moe.dispatcher = dispatcher
        modules.append(moe.experts)
    return modules
