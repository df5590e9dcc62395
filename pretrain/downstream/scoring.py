"""Scoring olmo-eval requests with any model that gives per-token log-probabilities.

Every request is one row: its query (context, then the continuation but its last token) from
position 0, right-padded; the row's labels are the query shifted by one with the continuation's
last token at the end. A ``logprobs(tokens [B, L], labels [B, L]) -> [B, L]`` function (the
trainer's parallelised model, a checkpoint, an HF export) gives ``log p(label_t | tokens_<=t)``;
the continuation's are ``[ctx_len - 1, ctx_len + cont_len - 1)``, as olmo-eval slices its logits.

Questions (olmo-eval's ``doc_id``), not requests, are dealt to the data-parallel ranks, since a
question's accuracy is an argmax over all its choices; every rank runs the same number of
forwards (a rank with fewer repeats one and drops it), because sharded tables and expert
parallelism exchange data in every forward. The continuation log-probabilities are gathered, and
each rank feeds them to olmo-eval's ``ICLMetric``, whose definitions (acc, len_norm, bpb,
ce_loss, soft, v1 without and v2 with the leading space) are the ones reported. The metric takes
logits: a continuation token of log-probability ``lp`` becomes the two-way logits
``(lp, log(1 - e^lp))`` with the token at index 0, whose cross-entropy is ``-lp``.

Legend: B rows, L row length, C continuation length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from pretrain.downstream.tasks import TaskRequests

LENGTH_BUCKET = 64  # rows are padded to a multiple of this: few distinct shapes to compile


def rows_of(requests: TaskRequests, rank: int, degree: int) -> list[int]:
    """The request indices of this rank's questions: question k (in ``doc_id`` order) goes to
    rank ``k % degree``."""
    questions = sorted({s["doc_id"] for s in requests.samples})
    mine = set(questions[rank::degree])
    return [i for i, s in enumerate(requests.samples) if s["doc_id"] in mine]


def batches_of(
    requests: TaskRequests,
    indices: list[int],
    batch_tokens: int,
    fixed: tuple[int, int] | None = None,
) -> list[list[int]]:
    """Request indices in batches: longest first, as many rows as fit ``batch_tokens`` at the
    batch's padded length; ``fixed``: (rows, length) for every batch (a pipeline's shapes)."""
    order = sorted(indices, key=lambda i: -len(requests.samples[i]["query"]))
    if fixed is not None:
        rows = fixed[0]
        return [order[i : i + rows] for i in range(0, len(order), rows)]
    out: list[list[int]] = []
    for index in order:
        if out:  # longest first: the batch's first row sets its length
            width = _padded(len(requests.samples[out[-1][0]]["query"]), requests.max_seq_len)
            if (len(out[-1]) + 1) * width <= batch_tokens:
                out[-1].append(index)
                continue
        out.append([index])
    return out


def _padded(length: int, cap: int = 0) -> int:
    """``length`` rounded up to ``LENGTH_BUCKET``, at most ``cap`` (the model's length)."""
    padded = LENGTH_BUCKET * math.ceil(length / LENGTH_BUCKET)
    return min(padded, cap) if cap else padded


def row_tensors(
    requests: TaskRequests, batch: list[int], pad_id: int, fixed: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [B, L], labels [B, L])`` of a batch (rows padded with ``pad_id``)."""
    samples = [requests.samples[i] for i in batch]
    longest = max(len(s["query"]) for s in samples)
    rows, length = fixed or (len(samples), _padded(longest, requests.max_seq_len))
    tokens = np.full((rows, length), pad_id, dtype=np.int64)
    labels = np.full((rows, length), pad_id, dtype=np.int64)
    for row, s in enumerate(samples):
        query = s["query"]
        tokens[row, : len(query)] = query
        labels[row, : len(query) - 1] = query[1:]
        labels[row, len(query) - 1] = s["continuation"][-1]
    return tokens, labels


def continuation_logprobs(
    requests: TaskRequests,
    indices: list[int],
    logprobs: Callable[[np.ndarray, np.ndarray], torch.Tensor],
    pad_id: int,
    batch_tokens: int,
    num_forwards: int | None = None,
    fixed: tuple[int, int] | None = None,
) -> dict[int, np.ndarray]:
    """``{request index: log-probabilities of its continuation tokens [C]}`` of ``indices``,
    in ``num_forwards`` forwards (at least this rank's batches; the extra ones repeat a batch
    and are dropped)."""
    batches = batches_of(requests, indices, batch_tokens, fixed)
    out: dict[int, np.ndarray] = {}
    total = max(num_forwards or 0, len(batches))
    for step in range(total):
        batch = batches[min(step, len(batches) - 1)] if batches else None
        if batch is None:  # a rank without questions still runs its share of forwards
            batch = [0]
        tokens, labels = row_tensors(requests, batch, pad_id, fixed)
        values = logprobs(tokens, labels).float().cpu().numpy()
        if step >= len(batches):
            continue
        for row, index in enumerate(batch):
            s = requests.samples[index]
            start = s["ctx_len"] - 1
            out[index] = values[row, start : start + s["cont_len"]].astype(np.float64)
    return out


def num_batches(requests: TaskRequests, indices: list[int], batch_tokens: int, fixed=None) -> int:
    return len(batches_of(requests, indices, batch_tokens, fixed))


def task_metrics(requests: TaskRequests, scored: dict[int, np.ndarray]) -> dict[str, float]:
    """olmo-eval's ``ICLMetric`` of the task over every scored request (all ranks' together)."""
    return _metric(requests, sorted(scored), scored)


def question_metrics(
    requests: TaskRequests, scored: dict[int, np.ndarray]
) -> dict[str, list[float]]:
    """The same metrics of every question alone, in ``doc_id`` order (each task metric is
    their mean): what paired comparisons between runs resample."""
    by_question: dict[int, list[int]] = {}
    for index in sorted(scored):
        by_question.setdefault(requests.samples[index]["doc_id"], []).append(index)
    out: dict[str, list[float]] = {}
    for question in sorted(by_question):
        for name, value in _metric(requests, by_question[question], scored).items():
            out.setdefault(name, []).append(value)
    return out


def _metric(requests: TaskRequests, indices: list[int], scored) -> dict[str, float]:
    from olmo_eval import ICLMetric

    metric = ICLMetric(metric_type=requests.metric_type)
    # the log-probabilities were gathered already: no sync of the metric's own over the world
    # (ICLMetric turns torchmetrics' sync on in its constructor, which sets both flags)
    metric.sync_on_compute = metric._to_sync = False
    for start in range(0, len(indices), 256):
        chunk = indices[start : start + 256]
        metric.update(*_metric_inputs(requests, chunk, scored))
    return {name: float(value) for name, value in metric.compute().items()}


def _metric_inputs(requests: TaskRequests, chunk: list[int], scored: dict[int, np.ndarray]):
    """ICLMetric's batch for ``chunk``: the samples' fields, each continuation's tokens as index
    0 and ``ctx_len`` 1, and two-way logits [B, C, 2] whose cross-entropy is ``-lp``."""
    samples = [requests.samples[i] for i in chunk]
    longest = max(len(scored[i]) for i in chunk)
    lp = torch.full((len(chunk), longest), 0.0, dtype=torch.float64)
    for row, index in enumerate(chunk):
        lp[row, : len(scored[index])] = torch.from_numpy(scored[index])
    rest = torch.log1p(-torch.exp(lp).clamp(max=1.0))  # the mass of every other token
    logits = torch.stack([lp, rest], dim=-1)

    def column(key: str) -> torch.Tensor:
        return torch.tensor([s[key] for s in samples], dtype=torch.long)

    batch = {
        "doc_id": column("doc_id"),
        "cont_id": column("cont_id"),
        "continuation": torch.zeros(len(chunk), longest, dtype=torch.long),
        "ctx_len": torch.ones(len(chunk), dtype=torch.long),
        "dc_len": torch.ones(len(chunk), dtype=torch.long),
        "cont_len": column("cont_len"),
        "cont_str_len": column("cont_str_len"),
        "cont_byte_len": column("cont_byte_len"),
        "cont_str_len_no_leading_space": column("cont_str_len_no_leading_space"),
        "cont_byte_len_no_leading_space": column("cont_byte_len_no_leading_space"),
        "label_id": column("label_id"),
    }
    return batch, logits
