"""Counting host synchronisations on CPU: what a CUDA step would wait for.

``HostSyncCounter`` records every call that reads tensor values back to the host (``.item()``,
``.tolist()``, ``bool(t)``, ``int(t)``, ``.cpu()``, ``.numpy()``) and every aten op whose output
size depends on tensor values (``nonzero``, ``bincount``, ``unique``, boolean indexing,
``repeat_interleave`` without ``output_size``, ...). On CUDA each of these blocks the host until
the device catches up. Tensors that are host-side by design (a lookup plan's unique rows and
counts, marked by ``data.batch.host_side``) are not counted.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}
DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.bincount.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten._unique.default,
    aten.argwhere.default,
}


class _Methods(TorchFunctionMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and not getattr(args[0] if args else None, "host_side", False):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DATA_DEPENDENT:
            self.counts[str(func)] += 1
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.counts[str(func)] += 1
        elif func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        ):
            self.counts["aten.index (boolean mask)"] += 1
        return func(*args, **kwargs)


class HostSyncCounter:
    """``with HostSyncCounter() as c: ...`` then ``c.counts`` (name -> calls), ``c.total``."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._modes = [_Methods(self.counts), _Ops(self.counts)]

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
