"""Checkpoints reshard: a run saved with one layout evaluates to the same held-out loss when loaded
at another (Engram-table parallel 4 -> 2 ranks -> 1 process; TP2 x PP2 -> 1 process; 5 experts
over EP 2, padding slot included, <-> 1 process; table-parallel shards on disk -> one table in
host memory -> the device; context parallel 2 -> 1 process, its validation loss computed on
chunks of every row)."""

from __future__ import annotations

import pytest

from pretrain.config import load_config
from pretrain.train import Trainer

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "tables4": dict(data_parallel_replicate_degree=4, engram_shard_degree=4),
    "tables2": dict(data_parallel_replicate_degree=2, engram_shard_degree=2),
    "tables2_disk": dict(data_parallel_replicate_degree=2, engram_shard_degree=2),
    "tp2pp2": dict(
        tensor_parallel_degree=2, pipeline_parallel_degree=2, data_parallel_shard_degree=1
    ),
    # context parallel 2 (FSDP over the cp ranks), tables row-sharded over both
    "cp2": dict(context_parallel_degree=2, engram_shard_degree=2),
    "single": {},
    "single_host": {},
    # 5 experts over EP 2: 3 slots per rank, the last one padding (kept out of checkpoints)
    "ep2_uneven": dict(data_parallel_replicate_degree=2, expert_parallel_degree=2),
}
EXPERTS = "--model.overrides.moe.num_routed_experts=5"
PLACEMENT = {"tables2_disk": "disk", "single_host": "host"}  # [engram_table] placement


def _overrides(corpus, dump, layout, experts5=False):
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
    extra = [EXPERTS] if experts5 else []
    if layout in PLACEMENT:
        extra.append(f"--engram_table.placement={PLACEMENT[layout]}")
    return base + extra + [f"--parallelism.{k}={v}" for k, v in LAYOUTS[layout].items()]


def _fit(rank, world, corpus, dump, layout, experts5=False):
    overrides = _overrides(corpus, dump, layout, experts5)
    trainer = Trainer(load_config("pretrain/configs/debug.toml", overrides))
    summary = trainer.fit()
    return summary["val_loss"], trainer.step


def _single(corpus, dump, experts5=False) -> float:
    overrides = _overrides(corpus, dump, "single", experts5)
    single = Trainer(load_config("pretrain/configs/debug.toml", overrides))
    assert single.step == 4
    return single.evaluate()[0]


@pytest.mark.parametrize(
    "saved, world, loaded, loaded_world, experts5",
    [
        pytest.param("tables4", 4, "tables2", 2, False, marks=pytest.mark.slow),
        pytest.param("tp2pp2", 4, None, None, False, marks=pytest.mark.slow),
        ("ep2_uneven", 2, None, None, True),
        pytest.param("single", 1, "ep2_uneven", 2, True, marks=pytest.mark.slow),
        # row shards on disk (prefetched, routed a step ahead) -> one host table -> device
        pytest.param("tables2_disk", 2, "single_host", 1, False, marks=pytest.mark.slow),
        pytest.param("cp2", 2, None, None, False, marks=pytest.mark.slow),
    ],
)
def test_checkpoint_reshards(corpus, tmp_path, saved, world, loaded, loaded_world, experts5):
    from tests.distributed.helpers import run_ranks

    dump = str(tmp_path / "run")
    results = run_ranks(_fit, world, str(corpus), dump, saved, experts5, fresh=True)
    assert all(step == 4 for _, step in results.values())
    loss = results[0][0]
    if loaded is not None:
        resumed = run_ranks(_fit, loaded_world, str(corpus), dump, loaded, experts5, fresh=True)
        assert all(step == 4 for _, step in resumed.values())
        assert resumed[0][0] == pytest.approx(loss, rel=1e-5)
    assert _single(corpus, dump, experts5) == pytest.approx(loss, rel=1e-5)
