"""Tensor parallelism against the single-process run: TP2 for GQA and MLA (column/row-parallel
attention and FFN, vocab-parallel LM head and loss), and TP2 x FSDP2 with EP2 and Engram-table
parallelism on 4 ranks; each with and without sequence parallelism."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from models.parallel_plans import validate_parallelism
from models.parallelize import parallelize_deepseek_engram
from models.transformer import Transformer
from parallel.dims import ParallelDims
from pretrain.config import OptimizerConfig, ParallelismConfig
from pretrain.optimizer import Optimizers
from tests.distributed.test_data_parallel import _args, _full_state, _initial_state, _train
from tests.distributed.test_expert_parallel import _gather, _sum

pytestmark = pytest.mark.distributed
VOCAB = 98  # divisible by the tensor-parallel degree


def _rank_fn(
    rank: int, world: int, attention: str, tp: int, ep: int, etp: int, sp: bool, ckpt: str
):
    cfg = ParallelismConfig(
        data_parallel_shard_degree=world // tp,
        tensor_parallel_degree=tp,
        expert_parallel_degree=ep,
        engram_table_parallel_degree=etp,
    )
    dims = ParallelDims.from_config(cfg, world)
    validate_parallelism(_args(True, attention, VOCAB), dims, sp, seq_len=16)
    with torch.device("meta"):
        model = Transformer(_args(True, attention, VOCAB))
    mesh = dims.build_mesh("cpu")
    model, inner, plan = parallelize_deepseek_engram(
        model, dims, mesh, "cpu", 0, sequence_parallel=sp
    )
    # the single-process weights, resharded by DCP onto this layout (FSDP x TP, EP, table shards)
    state = get_model_state_dict(inner)
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(inner, state)
    opts = Optimizers(model, OptimizerConfig(lr=1e-2))
    dp_rank, dp = rank // tp, world // tp
    per = 4 // dp
    losses, grads = _train(
        model,
        inner,
        opts,
        slice(per * dp_rank, per * dp_rank + per),
        plan,
        group=dims.dp_group(mesh),
        token_groups=plan.token_groups,
    )
    mean = [t.item() / world for t in (_sum(x) for x in losses)]
    state = _full_state(inner)
    for name in [n for n in grads if ".experts." in n or n.endswith("table.weight")]:
        pieces = _gather(grads[name])  # ranks in order; keep one tp rank per shard
        keep = ep if ".experts." in name else etp
        grads[name] = torch.cat(pieces[::tp][:keep])
    return mean, grads, state


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp_sp"])
@pytest.mark.parametrize(
    "world, attention, tp, ep, etp", [(2, "gqa", 2, 1, 1), (2, "mla", 2, 1, 1), (4, "mla", 2, 2, 2)]
)
def test_tensor_parallel_matches_single_process(world, attention, tp, ep, etp, sp, tmp_path):
    from tests.distributed.helpers import run_ranks
    from tests.distributed.test_data_parallel import _reference, check_parity

    ckpt = str(tmp_path / "init")
    dcp.save(
        _initial_state(True, attention=attention, vocab=VOCAB).state_dict(), checkpoint_id=ckpt
    )
    check_parity(
        _reference(True, attention=attention, vocab=VOCAB),
        run_ranks(_rank_fn, world, attention, tp, ep, etp, sp, ckpt),
    )
