"""Downstream scores do not depend on the layout: at 2 gloo ranks (data parallel; FSDP with the
Engram tables row-sharded; a 2-stage pipeline through its schedule) every task's numbers equal
the one-process numbers of the same weights: exact accuracies, bpb within 1e-6."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("olmo_eval")

from tests.distributed.parity import model_args, save_initial  # noqa: E402

pytestmark = pytest.mark.distributed

TASKS = ["arc_easy_rc_0shot", "piqa_rc_0shot", "arc_easy_rc_0shot_bpb"]
QUESTIONS = 7  # odd: the ranks hold different numbers of questions
VOCAB = 1000


def _args():
    args = model_args(sparse=True, vocab=VOCAB, layers=2)
    args.max_seq_len = 256
    return args


def _requests(tokenizer_path: str):
    from data.tokenizer import load_tokenizer
    from pretrain.downstream.tasks import build_requests

    tok = load_tokenizer(tokenizer_path)
    return tok, [build_requests(label, tok, 256, QUESTIONS, 0) for label in TASKS]


def _hasher(args, tok):
    from data.ngram_hash import CompressedTokenizer, NgramHasher

    return NgramHasher(args.engram.hash, CompressedTokenizer.from_tokenizer(tok))


def _single(tokenizer_path: str) -> dict:
    from parallel.plan import ParallelPlan
    from pretrain.downstream.evaluator import model_logprobs, score_tasks
    from pretrain.step import StepModel
    from tests.distributed.parity import initial_model

    args = _args()
    tok, requests = _requests(tokenizer_path)
    model = initial_model(args).eval()
    scorer = model_logprobs(StepModel(model, model, ParallelPlan()), _hasher(args, tok), "cpu")
    return score_tasks(requests, scorer, tok.eos_id, 1024)


def _rank(rank: int, world: int, layout: dict, ckpt: str, tokenizer_path: str) -> dict:
    from models.parallelize import parallelize_deepseek_engram
    from models.transformer import Transformer
    from parallel.dims import ParallelDims
    from parallel.distributed import cpu_group_for
    from pretrain.config import ParallelismConfig
    from pretrain.downstream.evaluator import model_logprobs, score_tasks
    from pretrain.pipeline_runner import PipelineRunner
    from pretrain.step import StepModel
    from tests.distributed.parity import load_initial

    args = _args()
    cfg = ParallelismConfig(**layout)
    dims = ParallelDims.from_config(cfg, world)
    with torch.device("meta"):
        model = Transformer(args)
    model, inner, plan = parallelize_deepseek_engram(model, dims, dims.build_mesh("cpu"), "cpu", 0)
    load_initial(inner, ckpt)
    pipeline = PipelineRunner(plan, cfg, torch.device("cpu"), 1, inner) if dims.pp > 1 else None
    sm = StepModel(model, inner, plan, pipeline)
    sm.model.eval()
    tok, requests = _requests(tokenizer_path)
    chunks = pipeline.microbatches if pipeline is not None else 1
    scorer = model_logprobs(sm, _hasher(args, tok), "cpu", chunks)
    group = cpu_group_for(plan.dp_group or dist.group.WORLD) if dims.dp_degree > 1 else None
    return score_tasks(
        requests,
        scorer,
        tok.eos_id,
        1024,
        dims.dp_rank(rank),
        dims.dp_degree,
        group,
        fixed=(4, 256) if pipeline is not None else None,
    )


LAYOUTS = {
    "dp2": dict(data_parallel_replicate_degree=2),
    "fsdp2_tables2": dict(data_parallel_shard_degree=2, engram_shard_degree=2),
    "pp2": dict(pipeline_parallel_degree=2, pipeline_microbatches=2),
}


@pytest.mark.parametrize(
    "name",
    [  # the tables' all-to-all and FSDP's gathers in the default set; the others in --all
        pytest.param("dp2", marks=pytest.mark.slow),
        "fsdp2_tables2",
        pytest.param("pp2", marks=pytest.mark.slow),
    ],
)
def test_downstream_scores_do_not_depend_on_the_layout(name, corpus, tmp_path):
    from tests.distributed.helpers import run_ranks

    tokenizer_path = str(corpus / "tokenizer.model")
    ckpt = save_initial(_args(), tmp_path / "init")
    want = _single(tokenizer_path)
    results = run_ranks(_rank, 2, LAYOUTS[name], ckpt, tokenizer_path)
    for rank, got in results.items():
        assert set(got) == set(want)
        for label, metrics in want.items():
            for metric, value in metrics.items():
                if metric.startswith(("acc", "len_norm")):
                    assert got[label][metric] == value, (rank, label, metric)
                else:
                    assert got[label][metric] == pytest.approx(value, abs=1e-6), (
                        rank,
                        label,
                        metric,
                    )
