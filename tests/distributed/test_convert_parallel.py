"""Conversion of a checkpoint saved by 2 ranks (FSDP with table-parallel Engram row shards): DCP
-> HF -> DCP at one rank is bit-exact, and transformers' logits match ours."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import load_config
from pretrain.conversion import convert
from pretrain.train import Trainer
from tests.distributed.test_reshard import _overrides

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")


def _fit_fsdp_tables(rank, world, corpus, dump):
    overrides = _overrides(corpus, dump, "single") + [
        "--parallelism.data_parallel_shard_degree=2",
        "--parallelism.engram_shard_degree=2",
    ]
    trainer = Trainer(load_config("pretrain/configs/debug.toml", overrides))
    trainer.fit()
    trainer.loader.close()
    return trainer.step


@pytest.mark.slow  # conversion is covered in one process
def test_two_rank_fsdp_table_parallel_checkpoint_converts_bit_exact(corpus, tmp_path):
    from tests.distributed.helpers import run_ranks

    dump = tmp_path / "run"
    assert run_ranks(_fit_fsdp_tables, 2, str(corpus), str(dump), fresh=True) == {0: 4, 1: 4}
    saved = dump / "checkpoints" / "step-00000004"
    assert convert.DcpCheckpoint(saved).meta["world_size"] == 2
    hf = convert.dcp_to_hf(saved, tmp_path / "hf")
    back = convert.hf_to_dcp(hf, tmp_path / "back")
    a, b = convert.DcpCheckpoint(saved), convert.DcpCheckpoint(back)
    entries = a.entries()
    assert set(entries) == set(b.entries())
    for name, entry in entries.items():
        assert torch.equal(a.read(name, entry), b.read(name, entry)), name
    model, args, tok = convert.load_model(back)  # the one-rank layout
    hasher = convert.hasher_for(args, tok)
    ids = torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    engram = {k: torch.from_numpy(v) for k, v in hasher.hash(ids.numpy()).items()}
    remote = transformers.AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    with torch.no_grad():
        diff = (model(ids, engram=engram).logits - remote(ids, use_cache=False).logits).abs()
    assert diff.max().item() < 1e-5
