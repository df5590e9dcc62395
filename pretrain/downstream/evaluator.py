"""Downstream tasks scored by our model: in the training loop on any layout, and on a checkpoint
(a DCP folder or our HF export) in one process.

The same questions, rows and metric code serve both, so the in-loop numbers at a step equal the
offline ones on the checkpoint saved there (at the same dtype). The Engram hash ids of every row
come from the run's own hasher, as in training; the lookups are planned by the tables' planners,
as the loader plans them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.batch import Batch, EngramInputs, plan_lookups
from pretrain.downstream.scoring import (
    continuation_logprobs,
    num_batches,
    question_metrics,
    rows_of,
    task_metrics,
)
from pretrain.downstream.tasks import (
    TaskRequests,
    default_cache_dir,
    load_requests,
    resolve_tasks,
)
from pretrain.step import StepModel, lookup_planners, token_logprobs

log = logging.getLogger(__name__)


def model_logprobs(sm: StepModel, hasher, device, plan_chunks: int = 1) -> Callable:
    """``logprobs(tokens [B, L], labels [B, L]) -> [B, L]`` of a step model: every row one
    document from position 0, hashed by ``hasher``, lookups planned by the tables' planners."""
    planners = lookup_planners(sm.inner)

    def logprobs(tokens: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        rows, length = tokens.shape
        positions = np.broadcast_to(np.arange(length), (rows, length)).copy()
        doc_ids = np.zeros((rows, length), dtype=np.int64)
        engram = {}
        if hasher is not None:
            hashed = hasher.hash(tokens, doc_ids)
            engram = {layer: EngramInputs(ids) for layer, ids in hashed.items()}
        batch = plan_lookups(
            Batch(tokens, labels, positions, doc_ids, engram), planners, plan_chunks
        )
        return token_logprobs(sm, batch.to_torch().to(device)).cpu()

    return logprobs


def hf_logprobs(model) -> Callable:
    """The same function for a transformers model (our HF export hashes inside its forward)."""

    @torch.no_grad()
    def logprobs(tokens: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        logits = model(torch.from_numpy(tokens), use_cache=False).logits.float()
        picked = torch.from_numpy(labels).unsqueeze(-1)
        return torch.log_softmax(logits, dim=-1).gather(-1, picked).squeeze(-1)

    return logprobs


def score_tasks(
    requests: list[TaskRequests],
    logprobs: Callable,
    pad_id: int,
    batch_tokens: int,
    dp_rank: int = 0,
    dp_degree: int = 1,
    group=None,
    fixed: tuple[int, int] | None = None,
    per_question: dict | None = None,
) -> dict[str, dict[str, float]]:
    """``{label: {metric: value}}``: each task's questions dealt over the ``dp_degree`` ranks
    of ``group`` (None: one process), the same number of forwards on each, the continuation
    log-probabilities gathered, and olmo-eval's metrics computed on every rank.
    ``per_question``: filled with ``{label: {metric: [value of each question]}}``."""
    out = {}
    for task in requests:
        mine = rows_of(task, dp_rank, dp_degree)
        count = torch.tensor([num_batches(task, mine, batch_tokens, fixed)])
        if group is not None:
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
        scored = continuation_logprobs(
            task, mine, logprobs, pad_id, batch_tokens, int(count), fixed
        )
        if group is not None:
            parts: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, scored, group=group)
            scored = {k: v for part in parts for k, v in part.items()}
        out[task.label] = {**task_metrics(task, scored), "truncated_frac": task.truncated_frac}
        if per_question is not None:
            per_question[task.label] = question_metrics(task, scored)
    return out


def flatten(results: dict[str, dict[str, float]], seconds: float) -> dict[str, float]:
    """``eval/<task>/<metric>`` scalars and ``eval/downstream_s``."""
    out = {f"eval/{label}/{k}": v for label, metrics in results.items() for k, v in metrics.items()}
    out["eval/downstream_s"] = seconds
    return out


class DownstreamEvaluator:
    """The trainer's ``[downstream]`` section: tasks resolved up front (an unknown label or a
    missing extra stops the job before it trains), requests tokenised once per run (and cached
    across runs), scored through the parallelised model.

    Args:
        cfg: ``[downstream]``.
        tokenizer, hasher: the run's.
        max_seq_len: the model's (olmo-eval's ``model_ctx_len``).
        dp_rank, dp_degree, dp_group: this rank's data-parallel place (questions are dealt
            over it) and a CPU group of its ranks (None: one).
        device: where the model runs.
        default_batch_tokens: ``training.batch_size x seq_len``, when ``batch_tokens`` is 0.
        fixed: (rows, length) of every forward (a pipeline schedule's shapes), or None.
    """

    def __init__(
        self,
        cfg,
        tokenizer,
        hasher,
        max_seq_len: int,
        dp_rank: int,
        dp_degree: int,
        dp_group,
        device,
        default_batch_tokens: int,
        fixed: tuple[int, int] | None = None,
        plan_chunks: int = 1,
    ):
        self.cfg, self.tokenizer, self.hasher = cfg, tokenizer, hasher
        self.labels = resolve_tasks(cfg.tasks)
        self.max_seq_len = max_seq_len
        self.dp_rank, self.dp_degree, self.dp_group = dp_rank, dp_degree, dp_group
        self.device, self.fixed, self.plan_chunks = device, fixed, plan_chunks
        self.batch_tokens = cfg.batch_tokens or default_batch_tokens
        self._requests: list[TaskRequests] | None = None
        self.per_question: dict = {}

    def requests(self) -> list[TaskRequests]:
        if self._requests is None:
            cache = Path(self.cfg.cache_dir) if self.cfg.cache_dir else default_cache_dir()
            self._requests = [
                load_requests(
                    label,
                    self.tokenizer,
                    self.max_seq_len,
                    self.cfg.max_examples,
                    self.cfg.seed,
                    cache,
                )
                for label in self.labels
            ]
        return self._requests

    def run(self, sm: StepModel) -> dict[str, float]:
        """Every task once: ``eval/<task>/<metric>`` and ``eval/downstream_s``; each question's
        values stay in ``self.per_question`` (paired comparisons between runs)."""
        started = time.perf_counter()
        requests = self.requests()
        self.per_question = {}
        sm.model.eval()
        try:
            results = score_tasks(
                requests,
                model_logprobs(sm, self.hasher, self.device, self.plan_chunks),
                self.tokenizer.eos_id,
                self.batch_tokens,
                self.dp_rank,
                self.dp_degree,
                self.dp_group,
                self.fixed,
                self.per_question,
            )
        finally:
            sm.model.train()
        return flatten(results, time.perf_counter() - started)


# ----- on a checkpoint ------------------------------------------------------------------------


def is_hf_folder(path: Path) -> bool:
    """An exported Hugging Face folder (``launch.convert dcp-to-hf``), not a DCP checkpoint."""
    return (Path(path) / "config.json").is_file() and not (Path(path) / ".metadata").is_file()


def load_scorer(checkpoint: str | Path, tokenizer: str | None = None, config: str | None = None):
    """``(logprobs, our tokenizer, max_seq_len)`` of a DCP checkpoint (our model, one process,
    float32) or of our HF export (through transformers). A tokenizer named with ``tokenizer``
    must be the one the checkpoint was trained with."""
    from data.tokenizer import load_tokenizer
    from parallel.plan import ParallelPlan
    from pretrain.checkpoint_reader import CheckpointError, DcpCheckpoint, hasher_for, load_model

    path = Path(checkpoint)
    if is_hf_folder(path):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=True, dtype=torch.float32
        ).eval()
        found = [path / n for n in ("tokenizer.model", "tokenizer.json") if (path / n).is_file()]
        tok_path = Path(tokenizer) if tokenizer else (found[0] if found else None)
        if tok_path is None:
            raise CheckpointError(f"{path} holds no tokenizer: pass --tokenizer")
        expected = getattr(model.config, "tokenizer_identity", None)
        _check_identity(load_tokenizer(tok_path), expected, path)
        return hf_logprobs(model), load_tokenizer(tok_path), model.config.max_position_embeddings
    model, args, tok_path = load_model(path, config, tokenizer)
    _check_identity(
        load_tokenizer(tok_path), DcpCheckpoint(path).meta.get("tokenizer_identity"), path
    )
    sm = StepModel(model, model, ParallelPlan())
    logprobs = model_logprobs(sm, hasher_for(args, tok_path), torch.device("cpu"))
    return logprobs, load_tokenizer(tok_path), args.max_seq_len


def _check_identity(tok, expected: str | None, where: Path) -> None:
    from pretrain.checkpoint_reader import CheckpointError

    if expected and tok.identity != expected:
        raise CheckpointError(
            f"tokenizer {tok.path} ({tok.identity}) is not the one {where} was trained with "
            f"({expected}): every token id and Engram hash would differ; use the original "
            "tokenizer file (or drop --tokenizer)"
        )


def evaluate_checkpoint(
    checkpoint: str | Path,
    tasks: str,
    limit: int = 0,
    seed: int = 0,
    batch_tokens: int = 4096,
    tokenizer: str | None = None,
    config: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of a checkpoint on olmo-eval tasks (labels or suites), each
    on ``limit`` questions drawn with ``seed`` (0: all)."""
    labels = resolve_tasks(tasks)  # an unknown label is named before the model loads
    logprobs, tok, max_seq_len = load_scorer(checkpoint, tokenizer, config)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    requests = [load_requests(label, tok, max_seq_len, limit, seed, cache) for label in labels]
    return score_tasks(requests, logprobs, tok.eos_id, batch_tokens)
