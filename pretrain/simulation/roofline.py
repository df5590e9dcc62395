"""What every traced op costs on a GPU: a roofline time from its FLOPs and the bytes it moves.

``time = max(FLOPs / (peak x compute_efficiency), bytes / (HBM bandwidth x memory_efficiency))
+ launch`` per op that launches a kernel. An FP8 GEMM (``[quantize]``: a matmul of torchao's
float8 tensors) takes the FP8 peak times its own efficiency, which stays ``assumed`` (listed in
the calibration's summary) until a GPU measures it; its casts and amax reductions are the
element-wise and reduction kernels they are, memory-bound like any other. FLOPs come from
``torch.utils.flop_counter``'s formulas (matmuls, attention kernels; the grouped expert GEMM's
is registered by ``models.flop_count``), plus the simulator's fused attention. Bytes are read
from the fake tensors:

- an op reads its tensor inputs and writes its outputs (an in-place op reads and writes its
  target); views, reshapes and metadata ops launch nothing and cost nothing;
- gathers and scatters (embedding, index_select, index_add_, index_copy_, ...) touch only the
  rows they address, never the whole table: twice the rows moved plus the indices;
- a sparse tensor counts its values and indices (its dense size is the table's).

Under compiled blocks, ``pretrain.simulation.fusion`` merges each block's element-wise and
reduction kernels into the few that inductor launches before the times are taken.

The efficiencies and the launch overhead are measured, not guessed: ``benchmarks/calibration.json``
holds the constants fitted to stored measurements of ``benchmarks/gpu_step.py`` (device, torch
version and date included); ``python -m benchmarks.calibrate`` refits them.

Legend: B batch, H heads, T sequence, Dh head dim, E experts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

CALIBRATION = Path(__file__).resolve().parents[2] / "benchmarks" / "calibration.json"

# ops that address rows of a large tensor: cost by what they move, not by the tensor's size
INDEXED = {
    "embedding",
    "embedding_dense_backward",
    "index_select",
    "index_add",
    "index_add_",
    "index_copy",
    "index_copy_",
    "index_put",
    "index_put_",
    "_index_put_impl_",
    "gather",
    "scatter",
    "scatter_",
    "scatter_add",
    "scatter_add_",
    "index",
}
_FREE = {  # no kernel: metadata, allocation without initialisation, host scalars
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "_local_scalar_dense",
    "detach",
    "lift_fresh",
    "_to_copy_meta",
    "set_",
    "resize_",
    "record_stream",
    "_unsafe_view",
    "alias",
}


@dataclass
class Calibration:
    """Constants of the roofline, with where they were measured."""

    peak_tflops: float = 989.0  # H100 SXM dense bf16
    fp8_peak_tflops: float = 1979.0  # H100 SXM dense FP8
    fp8_compute_efficiency: float = 0.40  # the BF16 GEMMs' until measured (see ``assumed``)
    hbm_gbps: float = 3350.0  # H100 SXM HBM3
    compute_efficiency: float = 0.40
    memory_efficiency: float = 0.60
    launch_us: float = 4.0  # per kernel, what a step without CUDA graphs pays
    moe_imbalance: float = 1.0  # the slowest rank's expert GEMMs over the average
    bus_efficiency: float = 0.8  # attained fraction of a link's bandwidth by collectives
    device: str = "stated constants (not calibrated)"
    torch: str = ""
    date: str = ""
    fitted_to: dict = field(default_factory=dict)  # the measurements the constants reproduce
    assumed: list = field(default_factory=lambda: ["fp8_compute_efficiency"])  # not measured

    @classmethod
    def load(cls, path: Path | None = None) -> Calibration:
        """The stored calibration (``benchmarks/calibration.json``), or the stated defaults when
        there is none."""
        path = path or CALIBRATION
        if not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path | None = None) -> None:
        (path or CALIBRATION).write_text(json.dumps(asdict(self), indent=1) + "\n")

    def summary(self) -> dict:
        return {
            "device": self.device,
            "torch": self.torch,
            "date": self.date,
            "assumed": list(self.assumed),
        }


@dataclass
class OpRecord:
    """One kernel: its FLOPs and bytes, where it ran, and whose it was."""

    flops: float
    bytes: float
    phase: int  # the microbatch index, or -1 for the optimizer
    engram: bool  # Engram's own work (its modules, its table's optimizer)
    expert: bool  # routed-expert GEMMs (the load-imbalance factor applies)
    name: str = ""  # the aten op (reports)
    fp8: bool = False  # a float8 GEMM (the FP8 peak)
    # under compiled blocks (``fusion``): the block call that ran it (-1: eager), and the
    # tensors it read ((storage serial, bytes)) and wrote ((serial, bytes, made by this op))
    region: int = -1
    reads: tuple = ()
    writes: tuple = ()


def roofline_seconds(flops, nbytes, expert, cal: Calibration, fp8=False):
    """Seconds of kernels (floats, or numpy arrays of many: the calibration's fit)."""
    rate = np.where(
        fp8,
        cal.fp8_peak_tflops * 1e12 * cal.fp8_compute_efficiency,
        cal.peak_tflops * 1e12 * cal.compute_efficiency,
    )
    compute = np.divide(flops, rate)
    memory = np.divide(nbytes, cal.hbm_gbps * 1e9 * cal.memory_efficiency)
    seconds = np.maximum(compute, memory) + cal.launch_us * 1e-6
    return seconds * np.where(expert, cal.moe_imbalance, 1.0)


def op_seconds(op: OpRecord, cal: Calibration) -> float:
    return float(roofline_seconds(op.flops, op.bytes, op.expert, cal, op.fp8))


def is_float8(t: torch.Tensor) -> bool:
    """A torchao float8 training tensor (its data in a float8 dtype behind a high-precision
    face)."""
    data = getattr(t, "_data", None)
    return isinstance(data, torch.Tensor) and data.dtype.itemsize == 1 and data.is_floating_point()


def is_low_precision_operand(t: torch.Tensor) -> bool:
    """An FP8 GEMM's operand: a float8 tensor, or an expert weight torchao's MoE training wraps
    (its grouped GEMM quantises inside)."""
    return is_float8(t) or type(t).__name__.endswith("TrainingWeightWrapperTensor")


def _tensors(tree) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for ``t``: its elements (not its storage), a sparse tensor's values
    and indices; 0 where a fake sparse tensor's size is not known."""
    if is_float8(t):
        return int(t._data.numel())  # one byte per element
    try:
        if t.is_sparse:
            values, indices = t._values(), t._indices()
            return int(values.numel() * values.element_size() + indices.numel() * 8)
        return int(t.numel() * t.element_size())
    except (RuntimeError, TypeError, NotImplementedError):
        return 0


def op_cost(func, args, kwargs, out) -> tuple[float, float, bool, bool, tuple] | None:
    """(FLOPs, bytes, an expert GEMM, an FP8 GEMM, (the tensors it read, those it wrote)) of one
    dispatched op, or None when it launches nothing."""
    from torch.utils.flop_counter import flop_registry

    import models.flop_count  # noqa: F401 - registers the grouped expert GEMM's formula

    name = func.overloadpacket.__name__
    if name in _FREE or func.is_view or func._schema.name.startswith("c10d"):
        return None
    if func._schema.name.startswith("_c10d_functional"):
        return None  # collectives: the comm model
    inputs, outputs = _op_tensors(func, args, kwargs, out)
    if not outputs:  # metadata (device, sizes, ...) or a host value
        return None
    flops, expert = 0.0, name == "_grouped_mm"
    if func.overloadpacket in flop_registry:  # the grouped GEMM's: models.flop_count
        try:
            flops = float(flop_registry[func.overloadpacket](*args, **(kwargs or {}), out_val=out))
        except (TypeError, ValueError, RuntimeError, AttributeError):
            flops = 0.0
    if name in INDEXED:
        indices = [t for t in inputs if not t.is_floating_point() and not t.is_sparse]
        moved = sum(tensor_bytes(t) for t in outputs if t.is_floating_point())
        if name.endswith("_") or name.startswith(("index_put", "_index_put", "scatter")):
            moved = sum(  # in place: the rows written come from the source
                tensor_bytes(t) for t in inputs[1:] if t.is_floating_point()
            )
        moved = 2.0 * moved + sum(tensor_bytes(t) for t in indices)
        return flops, moved, expert, False, (inputs, outputs)
    written = {id(t) for t in outputs}
    read = sum(tensor_bytes(t) for t in inputs)
    fresh = sum(tensor_bytes(t) for t in outputs if id(t) not in {id(i) for i in inputs})
    in_place = sum(tensor_bytes(t) for t in inputs if id(t) in written)
    fp8 = flops > 0 and any(is_low_precision_operand(t) for t in inputs)
    return flops, float(read + fresh + in_place), expert, fp8, (inputs, outputs)


def _op_tensors(func, args, kwargs, out) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the tensors an op reads, those it writes: its outputs, or for an in-place op that
    returns nothing, such as ``_foreach_mul_``, its mutated arguments)."""
    return _tensors((args, kwargs)), _tensors(out) or _mutated(func, args, kwargs)


def _mutated(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes through its arguments (``Tensor(a!)``, ``Tensor(a!)[]``)."""
    out = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        if position < len(args):
            value = args[position]
        else:
            value = (kwargs or {}).get(argument.name)
        out += _tensors(value)
    return out


def attention_cost(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool):
    """(FLOPs, bytes) of fused causal attention (flash / flex): ``q [B, H, T, Dh]``; every query
    attends to half the keys on average; the kernel reads Q, K, V (and in backward also O, dO)
    and writes O (dQ, dK, dV); backward does 2.5x the forward's FLOPs (it recomputes the scores)."""
    batch, heads, seq, dim = q.shape
    keys = k.shape[-2]
    forward = 2.0 * batch * heads * seq * keys * (dim + v.shape[-1]) / 2
    io = sum(tensor_bytes(t) for t in (q, k, v)) + tensor_bytes(q) * v.shape[-1] // dim
    if backward:
        return 2.5 * forward, 2.0 * io + tensor_bytes(q) * v.shape[-1] // dim
    return forward, float(io)
