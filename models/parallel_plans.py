"""Model-structure knowledge the parallel plan needs: which linears are column/row parallel, how the
model splits into pipeline stages, and the model-dependent layout checks."""

from __future__ import annotations

import copy

from torch import nn

from models.args import ModelArgs
from models.attention import MLAttention
from parallel.dims import ParallelDims
from parallel.pipeline import stage_layer_ranges, stages_of_rank


def tensor_parallel_plan(model: nn.Module, vocab_parallel_loss: bool = True) -> dict[str, str]:
    """Which linears are column- and row-parallel. MoE routed experts, Engram, mHC, norms and the
    embedding stay replicated over tp (their inputs are replicated, so their gradients agree)."""
    # the head is vocab-sharded; under pipeline parallelism the last stage gathers its logits
    # (the schedule computes the loss on plain tensors)
    plan = {"output": "colwise_vocab" if vocab_parallel_loss else "colwise_gather"}
    if model.output is None:
        plan = {}
    for key, block in model.layers.items():
        prefix = f"layers.{key}."
        attention = block.attention
        if isinstance(attention, MLAttention):
            q = "wq_b" if hasattr(attention, "wq_b") else "wq"
            names = {
                q: "colwise",
                "wkv_b": "colwise",
                "wo": "rowwise",
                "rope_key": "grad_allreduce",
            }
        else:
            names = {"wq": "colwise", "wk": "colwise", "wv": "colwise", "wo": "rowwise"}
        plan.update({f"{prefix}attention.{n}": kind for n, kind in names.items()})
        if block.feed_forward is not None:
            ffn_path = "feed_forward"
        elif block.moe.shared_experts is not None:
            ffn_path = "moe.shared_experts"
        else:
            continue
        for n, kind in (("w1", "colwise"), ("w3", "colwise"), ("w2", "rowwise")):
            plan[f"{prefix}{ffn_path}.{n}"] = kind
    return plan


def validate_parallelism(args: ModelArgs, dims: ParallelDims) -> None:
    """Model-dependent checks, run before any process-group work (ValueError naming the field)."""
    tp, ep = dims.tp, dims.ep
    heads_ok = args.num_heads % tp == 0 and (args.attention == "mla" or args.num_kv_heads % tp == 0)
    checks = [
        (
            heads_ok,
            f"parallelism.tensor_parallel_degree={tp} must divide model.num_heads="
            f"{args.num_heads} and model.num_kv_heads={args.num_kv_heads}",
        ),
        (
            args.ffn_hidden_dim % tp == 0,
            f"parallelism.tensor_parallel_degree={tp} must divide "
            f"model.ffn_hidden_dim={args.ffn_hidden_dim}",
        ),
        (
            args.vocab_size % tp == 0,
            f"parallelism.tensor_parallel_degree={tp} must divide "
            f"model.vocab_size={args.vocab_size}",
        ),
        (
            not args.tie_embeddings or tp == 1,
            "model.tie_embeddings is not supported with tensor parallelism",
        ),
        (
            args.num_layers % dims.pp == 0,
            f"parallelism.pipeline_parallel_degree={dims.pp} must divide model.num_layers="
            f"{args.num_layers}",
        ),
    ]
    if args.moe is not None:
        checks.append(
            (
                args.moe.num_routed_experts % ep == 0,
                f"parallelism.expert_parallel_degree={ep} must divide "
                f"model.moe.num_routed_experts={args.moe.num_routed_experts}",
            )
        )
    elif ep > 1:
        checks.append((False, "parallelism.expert_parallel_degree > 1 needs an MoE flavor"))
    if dims.pp > 1 and args.moe is not None and args.moe.seq_aux_loss_coef > 0:
        checks.append(
            (
                False,
                "model.moe.seq_aux_loss_coef > 0 is not supported with pipeline "
                "parallelism (use the auxiliary-loss-free balancing)",
            )
        )
    if dims.etp > 1 and args.engram is None:
        checks.append((False, "parallelism.engram_table_parallel_degree > 1 needs Engram layers"))
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def split_pipeline(model: nn.Module, pp_rank: int, pp_degree: int, stages_per_rank: int):
    """Trim ``model`` (on meta) to the layers of this rank's stages.

    Returns ``(trimmed model, stage shells, stage ids, number of stages)``. The shells are
    ``Transformer`` views that share the trimmed model's modules, one per stage, so optimizers and
    checkpoints see one model with the full model's parameter names.
    """
    if model.args.tie_embeddings:
        raise ValueError("model.tie_embeddings is not supported with pipeline parallelism")
    num_stages = pp_degree * stages_per_rank
    ranges = stage_layer_ranges(model.args.num_layers, num_stages)
    stage_ids = stages_of_rank(pp_rank, pp_degree, stages_per_rank)
    owned = {str(i) for s in stage_ids for i in ranges[s]}
    for key in [k for k in model.layers if k not in owned]:
        del model.layers[key]
    if 0 not in stage_ids:
        model.tok_embeddings = None
    if num_stages - 1 not in stage_ids:
        model.merge = model.norm = model.output = None
    shells = []
    for s in stage_ids:
        shell = copy.copy(model)
        shell._modules = dict(model._modules)
        shell.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in ranges[s]})
        if s != 0:
            shell.tok_embeddings = None
        if s != num_stages - 1:
            shell.merge = shell.norm = shell.output = None
        shells.append(shell)
    return model, shells, stage_ids, num_stages


def apply_block_wrappers(model: nn.Module, activation_checkpoint: str, compile_blocks: bool):
    """Activation checkpointing (recompute each block in backward), then torch.compile per block."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in list(model.layers.items()):
        if activation_checkpoint == "full":
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile_blocks:
            block.compile()  # in place: parameter names and state-dict keys stay the same
        model.layers[key] = block
