"""Checkpoints reshard: a run saved with one layout evaluates to the same held-out loss when loaded
at another (Engram-table parallel 4 -> 2 ranks -> 1 process; TP2 x PP2 -> 1 process)."""

from __future__ import annotations

import pytest

from pretrain.config import load_config
from pretrain.train import Trainer

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "tables4": dict(data_parallel_replicate_degree=4, engram_shard_degree=4),
    "tables2": dict(data_parallel_replicate_degree=2, engram_shard_degree=2),
    "tp2pp2": dict(
        tensor_parallel_degree=2, pipeline_parallel_degree=2, data_parallel_shard_degree=1
    ),
    "single": {},
}


def _overrides(corpus, dump, layout):
    base = [
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
    ]
    return base + [f"--parallelism.{k}={v}" for k, v in LAYOUTS[layout].items()]


def _fit(rank, world, corpus, dump, layout):
    trainer = Trainer(load_config("pretrain/configs/debug.toml", _overrides(corpus, dump, layout)))
    summary = trainer.fit()
    return summary["val_loss"], trainer.step


def _single(corpus, dump) -> float:
    single = Trainer(load_config("pretrain/configs/debug.toml", _overrides(corpus, dump, "single")))
    assert single.step == 4
    return single.evaluate()[0]


@pytest.mark.parametrize(
    "saved, world, loaded, loaded_world", [("tables4", 4, "tables2", 2), ("tp2pp2", 4, None, None)]
)
def test_checkpoint_reshards(corpus, tmp_path, saved, world, loaded, loaded_world):
    from tests.distributed.helpers import run_ranks

    dump = str(tmp_path / "run")
    results = run_ranks(_fit, world, str(corpus), dump, saved)
    assert all(step == 4 for _, step in results.values())
    loss = results[0][0]
    if loaded is not None:
        resumed = run_ranks(_fit, loaded_world, str(corpus), dump, loaded)
        assert all(step == 4 for _, step in resumed.values())
        assert resumed[0][0] == pytest.approx(loss, rel=1e-5)
    assert _single(corpus, dump) == pytest.approx(loss, rel=1e-5)
