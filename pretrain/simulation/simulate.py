"""One training step of a recipe at its target layout, traced on fake tensors (``launch.dry_run``).

The rank's model is built on the meta device under a fake process group at the target world size,
parallelised by the real plan, materialised as fake tensors (``FakeTensorMode``: shapes, dtypes and
storages, no values), and driven through the real step: ``grad_accum_steps`` microbatches of
``forward_backward`` (the last one synchronising) and ``optimizer_step``. On the way:

- ``MemoryTracer`` follows every storage: parameters, gradients
  (the Engram tables' step row buffers, FSDP's unsharded accumulation
  buffers), optimizer moments, activations, the autocast weight copies, temporaries. Its peak is
  ``peak_gib_traced``. Not traced: the CUDA/NCCL contexts and allocator fragmentation, which the
  ``<= 72 of 80 GiB`` target leaves room for.
- ``CommRecorder`` (``pretrain.simulation.comm``) records every collective with its payload, process
  group and phase.

Values a fake tensor cannot give are modelled, and said so: the routed-token splits of expert
parallelism are balanced (the auxiliary-loss-free bias balances load), every rank asks a table
shard for as many rows as it serves (symmetric traffic), Engram hash ids are uniform over each
head's table (no n-gram repeats: the most traffic), ``.item()`` (the clip coefficient) reads
1.0, and attention keeps what the GPU's fused kernels keep (``fused_attention``: no ``T x T``
scores).
Under ``compile.enable`` the kernels of each block call are tagged with its region (forward, and
backward with the recompute: the autograd nodes the block made) and fused as inductor would
(``pretrain.simulation.fusion``). ``pretrain.simulation.cost_model`` turns the trace into times.

Legend: B batch per rank, T sequence, K Engram heads of a layer.
"""

from __future__ import annotations

import copy
import functools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from data.batch import Batch, EngramInputs, context_shard, plan_lookups
from models.args import ModelArgs
from models.spec import get_model_spec
from models.tables.table import RowPlan
from parallel.dims import ParallelDims
from pretrain.optimizer import Optimizers
from pretrain.rowwise_adam import RowwiseAdam
from pretrain.simulation.comm import COLLECTIVES, Collective, CommRecorder, mesh_axis_names
from pretrain.simulation.fusion import EAGER, fuse_compiled, nodes_between, watch_blocks
from pretrain.simulation.roofline import (
    OpRecord,
    attention_cost,
    op_cost,
    tensor_bytes,
)
from pretrain.step import StepModel, forward_backward, lookup_planners, optimizer_step


def _storages(t: torch.Tensor) -> list:
    """Storages behind a tensor: a DTensor's local shard, a sparse tensor's indices and values."""
    local = getattr(t, "_local_tensor", None)
    if local is not None:
        return _storages(local)
    if t.is_sparse:
        return [t._indices().untyped_storage(), t._values().untyped_storage()]
    return [t.untyped_storage()]


def _allocated(nbytes: int) -> int:
    """What the CUDA caching allocator hands out for ``nbytes`` (512-byte blocks)."""
    return -(-nbytes // 512) * 512


class _Propagating:
    """Stands in for DTensor's sharding-propagation lock (a null context by default): DTensor runs
    each op on global-shape fake arguments under it, which are metadata, not memory."""

    def __init__(self, tracer):
        self.tracer = tracer

    def __enter__(self):
        self.tracer.propagating += 1

    def __exit__(self, *exc):
        self.tracer.propagating -= 1


class StepTracer(TorchDispatchMode):
    """One dispatch mode for the whole trace: the collectives (``CommRecorder``), ``.item()`` on a
    fake tensor (it reads 1.0, or 1, and is counted), and the live tensor memory of the rank,
    storage by storage (creation, ``resize_`` as FSDP2 frees and refills its unsharded
    parameters, release), with its peak.

    Every storage carries a label: "model" for what exists on entry (``track``), then the phase it
    was made in ("forward", "backward", "optimizer"); gradients are relabelled "grads" after each
    microbatch and optimizer state "optimizer_state". ``peak_by_label`` is the split at the peak.
    """

    def __init__(self, rank: int):
        super().__init__()

        self.comm = CommRecorder(rank)
        self.scalars = 0
        self.propagating = 0
        self.live = WeakIdKeyDictionary()  # storage -> [bytes, label]
        self.by_label: dict[str, int] = defaultdict(int)
        self.total = self.peak = 0
        self.peak_by_label: dict[str, int] = {}
        self.phase = "model"
        self.ops: list[OpRecord] = []  # every kernel of the traced step (``roofline``)
        self.engram_optimizer = False  # inside the tables' row-wise optimizer step
        self.in_engram = 0  # inside an Engram module's forward (its hooks count)
        self.engram_nodes: set = set()  # the autograd nodes Engram's forwards made
        # the routed experts' grouped GEMMs run in FP8 on the GPU (their triton casts cannot be
        # traced on a CPU: the GEMMs take the FP8 peak, the casts are not charged)
        self.fp8_experts = False
        # compiled blocks (``fusion``): the block call running now, the backward region of each
        # autograd node a block's forward made, and a serial number per storage
        self.fusion = False
        self.region = EAGER
        self.region_nodes: dict = {}
        self.serials = WeakIdKeyDictionary()
        self.next_serial = 0

    def set_phase(self, phase: str, microbatch: int = -1, repeat: int = 1) -> None:
        self.phase = self.comm.phase = phase
        self.comm.microbatch, self.comm.repeat = microbatch, repeat

    def reset_peak(self) -> None:
        self.peak, self.peak_by_label = self.total, {k: v for k, v in self.by_label.items() if v}
        self.comm.records.clear()
        self.ops.clear()
        self.scalars = 0

    def add_cost(
        self,
        name: str,
        flops: float,
        nbytes: float,
        expert: bool = False,
        fp8: bool = False,
        tensors: tuple = ((), ()),
    ) -> None:
        """One kernel of the step (``roofline.OpRecord``), charged to the current phase and to
        Engram when an Engram module (or its table's optimizer) runs it; with compiled blocks
        modelled, also its region and what it read and wrote (``tensors``: inputs, outputs)."""
        if self.phase == "model":
            return
        phase = self.comm.microbatch if self.phase == "microbatch" else -1
        node = torch._C._current_autograd_node()  # in backward: the node being run
        engram = self.engram_optimizer or (
            node in self.engram_nodes if node is not None else self.in_engram > 0
        )
        region = self.region_nodes.get(node, EAGER) if node is not None else self.region
        record = OpRecord(flops, nbytes, phase, engram, expert, name, fp8, region)
        if self.fusion:  # every kernel's reads: what a region writes may be read outside it
            inputs, outputs = tensors
            record.reads = tuple((self._serial(t)[0], tensor_bytes(t)) for t in inputs)
            record.writes = tuple(
                (serial, tensor_bytes(t), fresh)
                for t in outputs
                for serial, fresh in [self._serial(t)]
            )
        self.ops.append(record)

    def _serial(self, t: torch.Tensor) -> tuple[int, bool]:
        """(the serial number of the storage behind ``t``, whether it is new)."""
        storage = _storages(t)[0]
        serial = self.serials.get(storage)
        if serial is not None:
            return serial, False
        self.next_serial += 1  # never reused (the map forgets freed storages)
        self.serials[storage] = self.next_serial
        return self.next_serial, True

    def track(self, tensors, label: str | None = None) -> None:
        for t in tensors:
            for storage in _storages(t):
                self._see(storage, label)

    def bytes_of(self, tensors) -> int:
        return sum(_allocated(st.nbytes()) for t in tensors for st in _storages(t))

    def _see(self, storage, label: str | None) -> None:
        import weakref

        info = self.live.get(storage)
        if info is None:
            info = [0, label or self._label()]
            self.live[storage] = info
            weakref.finalize(storage, self._resize, info, 0)
        elif label is not None and info[1] != label:
            self.by_label[info[1]] -= info[0]
            self.by_label[label] += info[0]
            info[1] = label
        self._resize(info, _allocated(storage.nbytes()))

    def _resize(self, info: list, size: int) -> None:
        change = size - info[0]
        info[0] = size
        self.by_label[info[1]] += change
        self.total += change
        if self.total > self.peak:
            self.peak = self.total
            self.peak_by_label = {k: v for k, v in self.by_label.items() if v}

    def _label(self) -> str:
        if self.phase != "microbatch":
            return self.phase
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def __enter__(self):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        self._saved = torch.UntypedStorage.resize_, ShardingPropagator._fake_mode_lock
        original_resize, tracer = torch.UntypedStorage.resize_, self

        def resize_(storage, size):
            original_resize(storage, size)
            tracer._see(storage, None)

        torch.UntypedStorage.resize_ = resize_
        ShardingPropagator._fake_mode_lock = _Propagating(self)
        return super().__enter__()

    def __exit__(self, *exc):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        torch.UntypedStorage.resize_, ShardingPropagator._fake_mode_lock = self._saved
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        from torch.utils._pytree import tree_leaves

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back here
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalars += 1
            return 1.0 if args[0].is_floating_point() else 1
        if func in COLLECTIVES and not self.propagating:
            self.comm.record(func, args)
        if func is torch.ops._c10d_functional.wait_tensor.default:
            out = args[0]  # in place on a GPU; the fake kernel would make a new tensor
        else:
            out = func(*args, **(kwargs or {}))
        if not self.propagating:
            if isinstance(out, torch.Tensor):
                self.track([out])
            else:
                self.track([t for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
            cost = op_cost(func, args, kwargs, out)
            if cost is not None:
                flops, nbytes, expert, fp8, tensors = cost
                fp8 = fp8 or (expert and self.fp8_experts)
                self.add_cost(func.overloadpacket.__name__, flops, nbytes, expert, fp8, tensors)
        return out


def balanced_splits(counts: torch.Tensor, recv_matrix: torch.Tensor, world: int, copies: int):
    """Expert parallelism with perfectly balanced routing: ``copies`` token copies split evenly
    over the ranks, sent and received (replaces ``AllToAllDispatcher.host_splits``)."""
    even = [copies // world + (1 if r < copies % world else 0) for r in range(world)]
    return even, list(even)


def _model_values(inner, tokens_per_rank: int) -> None:
    """Swap the two host exchanges that need values for their modelled versions."""
    for moe in inner.moe_layers():
        dispatcher = getattr(moe, "dispatcher", None)
        if hasattr(dispatcher, "host_splits"):
            copies = tokens_per_rank * moe.args.top_k
            dispatcher.host_splits = functools.partial(
                balanced_splits, world=dispatcher.world, copies=copies
            )
    for engram in inner.engram_layers():
        if hasattr(engram.table, "exchange_counts"):
            engram.table.exchange_counts = _symmetric  # receive what is sent


def _symmetric(send: torch.Tensor) -> torch.Tensor:
    return send.clone()


_TRACING: list[StepTracer] = []  # the tracer of the step being traced (attention charges it)


class _FusedAttention(torch.autograd.Function):
    """Attention as the GPU's fused kernels (flex / flash) hold it: the output and the row
    log-sum-exp are saved for backward, never the ``T x T`` scores that CPU SDPA's math path
    would materialise on these fake tensors (at 32K tokens, 64 GiB per layer)."""

    @staticmethod
    def forward(ctx, q, k, v):
        if _TRACING:
            _TRACING[-1].add_cost("attention", *attention_cost(q, k, v, backward=False))
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        if _TRACING:
            _TRACING[-1].add_cost("attention_backward", *attention_cost(q, k, v, backward=True))
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
    """``F.scaled_dot_product_attention`` during a trace: shapes and saved memory of the fused
    kernels (values are fake anyway)."""
    return _FusedAttention.apply(q, k, v)


def synthetic_batch(
    args, batch_size: int, seq_len: int, planners: dict, seed: int = 0, cp: tuple[int, int] = (1, 0)
) -> Batch:
    """Random tokens in one document per row, uniform hash ids per head, planned lookups;
    ``cp`` (degree, rank): this context-parallel rank's share of every row, as the loader
    keeps it."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, args.vocab_size, (batch_size, seq_len), dtype=np.int64)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int64), tokens.shape).copy()
    engram = {}
    if args.engram is not None:
        for layer in args.engram.layer_ids:
            sizes = args.engram.hash.table_sizes(layer)
            ids = np.stack([rng.integers(0, s, tokens.shape) for s in sizes], -1)  # [B, T, K]
            engram[layer] = EngramInputs(ids)
    batch = Batch(tokens, tokens.copy(), positions, np.zeros_like(tokens), engram)
    return plan_lookups(context_shard(batch, *cp), planners).to_torch()


@dataclass
class Trace:
    """What one simulated step of one rank did."""

    peak_bytes: int  # traced peak, plus the modelled sparse table gradients
    peak_by_label: dict[str, int]  # bytes by ``StepTracer`` label at the traced peak
    sparse_grad_bytes: int  # added to the peak (see ``sparse_grad_bytes``)
    collectives: list[Collective] = field(default_factory=list)
    modelled_scalars: int = 0
    microbatches: int = 1
    tokens_per_microbatch: int = 0
    trace_s: float = 0.0
    axis_names: dict[tuple[int, ...], str] = field(default_factory=dict)
    ops: list[OpRecord] = field(default_factory=list)  # every kernel (``roofline``)
    sparse_grad_bytes_per_microbatch: int = 0
    repeats: dict[int, int] = field(default_factory=dict)  # traced microbatch -> how many


def trace_step(cfg, world_size: int, rank: int) -> Trace:
    """One fake training step of ``cfg`` as ``rank`` of ``world_size`` (see the module doc).

    A warm-up step first creates the optimizer state (the steady state holds it through the
    forward and backward). Of the ``grad_accum_steps`` microbatches two are traced: the first,
    which stands for every non-final one (the same collectives; its gradients accumulate without
    synchronising), and the last, which synchronises. Sparse gradients have no rows on fake
    tensors (their size depends on values), so the Engram tables' are added to the peak as
    modelled by ``sparse_grad_bytes`` for every microbatch (uncoalesced, they grow each one).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    start = time.perf_counter()
    args, dims = job_layout(cfg, world_size)
    if dims.pp > 1:
        raise ValueError(
            "the simulator traces one rank of a layout without pipeline parallelism; "
            "pipeline_parallel_degree > 1 gets the analytical estimate (--analytical)"
        )
    num_micro = cfg.training.grad_accum_steps
    fake = FakeTensorMode(allow_non_fake_inputs=True)

    def fake_materialize(model):
        with fake:
            model.to_empty(device="cpu")
        return model

    tracer, hooks = None, []
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        mesh, (wrapped, inner, plan) = rank_model(cfg, args, dims, materialize_fn=fake_materialize)
        batch = synthetic_batch(
            args,
            cfg.training.batch_size,
            cfg.data.seq_len,
            lookup_planners(inner),
            seed=rank,
            cp=(dims.cp, dims.cp_rank(rank)),
        )
        _model_values(inner, batch.num_tokens)
        sm = StepModel(wrapped, inner, plan, None, cfg.training.mixed_precision)
        tracer = StepTracer(rank)
        tracer.fp8_experts = _fp8_experts(cfg)
        tracer.track([*wrapped.parameters(), *wrapped.buffers()], "model")
        fused = mock.patch.object(F, "scaled_dot_product_attention", fused_attention)
        table_step = mock.patch.object(RowwiseAdam, "step", _flagged(RowwiseAdam.step, tracer))
        hooks = _watch_engram(inner, tracer)
        if cfg.compile.enable:
            hooks += watch_blocks(inner, tracer)
        _TRACING.append(tracer)
        with fake, tracer, fused, table_step:
            optimizers = Optimizers(wrapped, cfg.optimizer, cuda=True)  # CUDA's kernels
            _warm_up(optimizers)
            tracer.track(_optimizer_state(optimizers), "optimizer_state")
            tracer.reset_peak()
            traced = [(0, num_micro - 1), (num_micro - 1, 1)] if num_micro > 1 else [(0, 1)]
            for i, repeat in traced:
                tracer.set_phase("microbatch", i, repeat)
                last = i == num_micro - 1
                forward_backward(sm, batch, scale=1.0 / num_micro, sync=last)
                grads = [p.grad for p in wrapped.parameters() if p.grad is not None]
                tracer.track(grads, "grads")
            tracer.set_phase("optimizer")
            optimizer_step(sm, optimizers, cfg.training.max_norm)
        axis_names = mesh_axis_names(dims, mesh, world_size)
    finally:
        for hook in hooks:
            hook.remove()
        if tracer in _TRACING:
            _TRACING.remove(tracer)
        dist.destroy_process_group()
    extra = num_micro * sparse_grad_bytes(args, batch)
    return Trace(
        peak_bytes=tracer.peak + extra,
        peak_by_label=tracer.peak_by_label,
        sparse_grad_bytes=extra,
        collectives=tracer.comm.records,
        modelled_scalars=tracer.scalars,
        microbatches=num_micro,
        tokens_per_microbatch=batch.num_tokens,
        trace_s=time.perf_counter() - start,
        axis_names=axis_names,
        ops=fuse_compiled(tracer.ops) if cfg.compile.enable else tracer.ops,
        sparse_grad_bytes_per_microbatch=extra // num_micro,
        repeats=dict(traced),
    )


def _watch_engram(model, tracer: StepTracer) -> list:
    """Hooks that tell the tracer which kernels are Engram's: inside an Engram module's forward,
    and, in backward, the autograd nodes between its output and its inputs."""
    from models.engram import Engram

    def enter(module, args):
        tracer.in_engram += 1

    def leave(module, args, output):
        tracer.in_engram -= 1
        tracer.engram_nodes.update(nodes_between(args, output))

    hooks = []
    for module in model.modules():
        if isinstance(module, Engram):
            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return hooks


def _flagged(step, tracer: StepTracer):
    """``RowwiseAdam.step`` that marks its kernels as Engram's."""

    @functools.wraps(step)
    def flagged(self, *args, **kwargs):
        tracer.engram_optimizer = True
        try:
            return step(self, *args, **kwargs)
        finally:
            tracer.engram_optimizer = False

    return flagged


def job_layout(cfg, world_size: int) -> tuple[ModelArgs, ParallelDims]:
    """The job's ``ModelArgs`` (its family's flavor and overrides) and layout at ``world_size``,
    checked before any process-group work."""
    spec = get_model_spec(cfg.model.family)
    args = spec.resolve_args(
        cfg.model.flavor,
        cfg.model.overrides,
        vocab_size=cfg.model.vocab_size,
        seq_len=cfg.data.seq_len,
    )
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    spec.validate_parallelism(args, dims, cfg.parallelism.sequence_parallel, cfg.data.seq_len)
    return args, dims


def rank_model(cfg, args, dims: ParallelDims, **kwargs):
    """``(mesh, (model, inner, plan))``: the job's model built on the meta device and
    parallelised by its family for this rank of a (fake) process group; ``kwargs`` go to the
    parallelize function."""
    spec = get_model_spec(cfg.model.family)
    with torch.device("meta"):
        model = spec.model_cls(args)
    for converter in spec.build_converters(lambda name: _as_on_gpu(getattr(cfg, name))):
        converter.convert(model)
    mesh = dims.build_mesh("cpu") if dims.world_size > 1 else None
    parallel = spec.parallelize(
        model,
        dims,
        mesh,
        "cpu",
        0,
        activation_checkpoint=cfg.activation_checkpoint.mode,
        mixed_precision=cfg.training.mixed_precision,
        **kwargs,
    )
    return mesh, parallel


def _as_on_gpu(section):
    """A converter's config section as the GPU runs it: FP8 not emulated (the simulated step is
    the GPU's, whose float8 GEMMs the roofline charges at the FP8 peak). The experts stay as
    they are: their FP8 grouped GEMM casts with triton kernels (``_fp8_experts`` charges it)."""
    float8 = getattr(getattr(section, "linear", None), "float8", None)
    if float8 is None:
        return section
    section = copy.deepcopy(section)
    section.linear.float8.emulate = False
    section.grouped_mm.enable = False
    return section


def _fp8_experts(cfg) -> bool:
    quantize = getattr(cfg, "quantize", None)
    return bool(quantize and quantize.linear.float8.enable and quantize.grouped_mm.enable)


def sparse_grad_bytes(args, batch: Batch) -> int:
    """One microbatch's sparse table gradients on this rank that the trace cannot see: a
    float32 row plus an int64 index per row a sharded table's shard is asked for (symmetric
    with what this rank requests), or per lookup of an unplanned table. A planned in-memory
    table's row buffer (``RowGradBuffer``) is traced like any tensor."""
    if args.engram is None or not args.engram.sparse_grad:
        return 0
    total = 0
    for inputs in batch.engram.values():
        plan = inputs.plan
        if isinstance(plan, RowPlan):
            continue
        rows = int(plan.send_counts.sum()) if plan is not None else inputs.hash_ids.numel()
        total += rows * (args.engram.head_dim * 4 + 8)
    return total


def _warm_up(optimizers: Optimizers) -> None:
    """One optimizer step on zero gradients (empty sparse ones for the row-wise tables), which
    creates the optimizer state."""
    for opt in optimizers.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if isinstance(opt, torch.optim.AdamW):
                    p.grad = torch.zeros_like(p)
                else:
                    rows = torch.zeros(1, 0, dtype=torch.int64)  # [1, 0]: no row touched
                    p.grad = torch.sparse_coo_tensor(rows, p.new_zeros(0, *p.shape[1:]), p.shape)
    optimizers.step()
    optimizers.zero_grad()


def _optimizer_state(optimizers) -> list[torch.Tensor]:
    return [
        v
        for opt in optimizers.optimizers
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    ]
