"""A data.mixture (megatron, tokens and text) continues its global sequence when a job resumes
at another DP degree: 2 ranks train and checkpoint, 1 rank resumes, and it reads the batches an
uninterrupted 1-rank job reads (docs/data.md)."""

from __future__ import annotations

import json

import numpy as np
import torch

STEPS = 3


def _mixture(root):
    from tests.test_mixture import _docs, _megatron

    a = _megatron(root / "a", _docs(0, 120, 3, 500, eos_every=2))
    np.save(root / "b.npy", np.concatenate(_docs(1, 150, 500, 1000)).astype(np.int32))
    records = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 3}) for i in range(150)]
    (root / "web.jsonl").write_text("\n".join(records) + "\n")
    return (
        f'--data.mixture=[{{name = "a", format = "megatron", path = "{a}", weight = 1}}, '
        f'{{name = "b", format = "tokens", path = "{root / "b.npy"}", weight = 2}}, '
        f'{{name = "web", format = "text", path = "{root / "web.jsonl"}", weight = 1}}]'
    )


def _config(corpus, dump, mixture, batch, steps, *layout):
    from pretrain.config import load_config
    from tests.test_trainer import _overrides

    extra = [
        mixture,
        f"--training.batch_size={batch}",
        f"--checkpoint.interval={STEPS}",
        "--metrics.eval_batches=1",
        "--lr_scheduler.warmup_steps=1",
        *layout,
    ]
    return load_config("pretrain/configs/debug.toml", _overrides(corpus, dump, steps, 0) + extra)


def _fit_two_ranks(rank, world, corpus, dump, mixture):
    from pretrain.train import Trainer

    ddp = "--parallelism.data_parallel_replicate_degree=2"
    trainer = Trainer(_config(corpus, dump, mixture, 2, STEPS, ddp))
    trainer.fit()
    trainer.loader.close()
    return trainer.step


def test_a_mixture_resumed_at_one_rank_continues_the_two_rank_sequence(corpus, tmp_path):
    from pretrain.train import Trainer
    from tests.distributed.helpers import run_ranks

    mixture = _mixture(tmp_path)
    dump = str(tmp_path / "run")
    assert run_ranks(_fit_two_ranks, 2, str(corpus), dump, mixture, fresh=True) == {0: 3, 1: 3}
    resumed = Trainer(_config(corpus, dump, mixture, 4, 2 * STEPS))  # 2 x 2 rows -> 1 x 4
    assert resumed.step == STEPS and resumed.loader.consumed == STEPS
    straight = Trainer(_config(corpus, tmp_path / "straight", mixture, 4, 2 * STEPS))
    for _ in range(STEPS):
        next(straight.loader)
    for _ in range(STEPS):
        assert torch.equal(next(resumed.loader).tokens, next(straight.loader).tokens)
    for trainer in (resumed, straight):
        trainer.loader.close()
