"""Checkpoints reshard: saved with Engram-table parallelism over 4 ranks, loaded at 2 ranks and at 1
process, the held-out loss is the same."""

from __future__ import annotations

import pytest

from pretrain.config import load_config
from pretrain.train import Trainer

pytestmark = pytest.mark.distributed


def _overrides(corpus, dump, world):
    return [
        f"--job.dump_folder={dump}",
        f"--data.dataset_path={corpus}",
        "--data.prepare_if_missing=false",
        "--data.seq_len=64",
        "--data.num_workers=0",
        "--training.batch_size=2",
        "--training.steps=4",
        "--checkpoint.interval=4",
        "--metrics.eval_freq=1000",
        "--metrics.eval_batches=6",
        "--metrics.enable_tensorboard=false",
        "--metrics.progress_bar=false",
        "--lr_scheduler.warmup_steps=1",
        f"--parallelism.data_parallel_replicate_degree={world}",
        f"--parallelism.engram_table_parallel_degree={world}",
    ]


def _fit(rank, world, corpus, dump):
    trainer = Trainer(load_config("pretrain/configs/debug.toml", _overrides(corpus, dump, world)))
    summary = trainer.fit()
    return summary["val_loss"], trainer.step


def test_table_parallel_checkpoint_reshards(corpus, tmp_path):
    from tests.distributed.helpers import run_ranks

    dump = str(tmp_path / "run")
    saved = run_ranks(_fit, 4, str(corpus), dump)
    loss4 = saved[0][0]
    assert all(result[1] == 4 for result in saved.values())
    resumed = run_ranks(_fit, 2, str(corpus), dump)
    assert all(step == 4 for _, step in resumed.values())
    assert resumed[0][0] == pytest.approx(loss4, rel=1e-5)
    single = Trainer(load_config("pretrain/configs/debug.toml", _overrides(corpus, dump, 1)))
    assert single.step == 4
    loss1, _ = single.evaluate()
    assert loss1 == pytest.approx(loss4, rel=1e-5)
