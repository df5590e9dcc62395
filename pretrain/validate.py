"""Held-out evaluation: the mean loss over the first ``metrics.eval_batches`` validation batches
(with a ``data.mixture``: of each source that has held-out documents, also reported per source).

The same global batches are evaluated whatever the layout: batch ``i`` goes to data-parallel rank
``i % dp_degree``, and the token-weighted sum is reduced over the data-parallel group, so a
checkpoint evaluates to the same loss at any world size.
"""

from __future__ import annotations

import itertools

import torch

from data.batch import Batch
from data.dataset import PackedShardStream
from parallel.distributed import all_reduce_sum_
from pretrain.step import StepModel, forward_loss


class Validator:
    """Evaluates a ``StepModel`` on the validation split.

    Args:
        stream_kwargs: the training stream's arguments (folder, shapes, hasher, planners, ...).
        num_batches: ``metrics.eval_batches``.
        dp_rank, dp_degree, dp_group: this rank's data-parallel index, the degree, the group.
        cp_group: the context-parallel group (None: none), whose ranks hold chunks of the same
            rows: the loss sums are reduced over it too.
        device: where the model runs.
    """

    def __init__(
        self,
        stream_kwargs: dict,
        num_batches: int,
        dp_rank: int,
        dp_degree: int,
        dp_group,
        device: torch.device,
        cp_group=None,
    ):
        self.mixture = "specs" in stream_kwargs
        self.stream_kwargs = {**stream_kwargs, "dp_rank": 0, "dp_degree": 1}
        if not self.mixture:
            self.stream_kwargs.update(split="val", shuffle=False)
        self.per_source: dict[str, float] = {}
        self.window_losses: list[float] = []  # the last run's mean loss of each batch
        self.num_batches = num_batches
        self.dp_rank, self.dp_degree, self.dp_group = dp_rank, dp_degree, dp_group
        self.cp_group = cp_group
        self.device = device
        self._batches: list[Batch] | None = None

    def batches(self) -> list[Batch]:
        """The validation batches (read once, then kept: they never change)."""
        if self._batches is None:
            self._batches, self._sources = self._read()
        return self._batches

    def _read(self) -> tuple[list[Batch], list[str]]:
        if not self.mixture:
            stream = PackedShardStream(**self.stream_kwargs).batches()
            batches = [b for b, _ in itertools.islice(stream, self.num_batches)]
            return batches, [""] * len(batches)
        from data.mixture_stream import MixtureStream

        stream = MixtureStream(**self.stream_kwargs)
        batches, names = [], []
        for spec in self.stream_kwargs["specs"]:
            if spec.val_path:
                found = stream.val_batches(spec, self.num_batches)
                batches += found
                names += [spec.name] * len(found)
        return batches, names

    @torch.no_grad()
    def run(self, sm: StepModel) -> tuple[float, int]:
        """(mean held-out loss, tokens evaluated over all ranks); a mixture without held-out
        data gives ``(nan, 0)``."""
        if self.mixture and not any(s.val_path for s in self.stream_kwargs["specs"]):
            return float("nan"), 0
        batches = self.batches()
        if not batches:
            raise ValueError(
                "the validation split has fewer tokens than one batch; lower training.batch_size"
                + (" or give a source a val_path" if self.mixture else "")
            )
        sm.model.eval()
        names = sorted(set(self._sources))
        # [overall, per source...] x [loss sum, tokens]
        total = torch.zeros(1 + len(names), 2, device=self.device, dtype=torch.float64)
        windows = torch.zeros(len(batches), device=self.device, dtype=torch.float64)
        for slot in range(-(-len(batches) // self.dp_degree)):
            index = slot * self.dp_degree + self.dp_rank
            # every rank runs the same number of forwards (sharded tables exchange rows in each);
            # a rank past the end repeats a batch and does not count it
            batch = batches[min(index, len(batches) - 1)]
            ce, _ = forward_loss(sm, batch.to_torch().to(self.device))
            ce = ce.to(self.device)
            if index < len(batches):
                tokens = batch.num_tokens
                row = torch.stack([ce.double() * tokens, ce.new_tensor(tokens).double()])
                total[0] += row
                windows[index] = ce.double()
                if self.mixture:
                    total[1 + names.index(self._sources[index])] += row
        all_reduce_sum_(total, self.dp_group)
        all_reduce_sum_(windows, self.dp_group)
        if self.cp_group is not None:
            all_reduce_sum_(total, self.cp_group)
            all_reduce_sum_(windows, self.cp_group)
            windows /= self.cp_group.size()  # each rank's chunk holds as many tokens
        sm.model.train()
        self.window_losses = windows.tolist()  # each batch's mean loss: paired comparisons
        if self.mixture:
            self.per_source = {
                n: (total[1 + i, 0] / total[1 + i, 1]).item() for i, n in enumerate(names)
            }
        return (total[0, 0] / total[0, 1]).item(), int(total[0, 1].item())
