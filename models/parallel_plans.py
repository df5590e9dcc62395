"""Model-structure knowledge the parallel plan needs: which linears are column/row parallel, how the
model splits into pipeline stages, and the model-dependent layout checks."""

from __future__ import annotations

import copy

from torch import nn

from models.args import ModelArgs
from models.attention import MLAttention
from parallel.dims import ParallelDims
from parallel.pipeline import stage_layer_ranges, stages_of_rank


def tensor_parallel_plan(
    model: nn.Module, vocab_parallel_loss: bool = True, sequence_parallel: bool = False
) -> dict[str, str]:
    """Which linears are column- and row-parallel. MoE routed experts, Engram, mHC, norms and the
    embedding stay replicated over tp.

    With ``sequence_parallel`` the residual streams between blocks are sharded on the sequence:
    attention, dense FFN and Engram (whose conv needs the whole sequence) gather it at their input
    and hand back sequence shards; norms, mHC and MoE work on the local tokens, and their gradients
    are summed over tp (``sequence_local_params``).
    """
    sp = sequence_parallel
    plan = {}
    if model.output is not None:
        # the head is vocab-sharded; under pipeline parallelism the last stage gathers its logits
        if vocab_parallel_loss:
            plan["output"] = "colwise_vocab_from_seq" if sp else "colwise_vocab"
        else:
            plan["output"] = "colwise_gather"
    if sp and model.tok_embeddings is not None:
        plan["tok_embeddings"] = "seq_output"
    for key, block in model.layers.items():
        prefix = f"layers.{key}."
        attention = block.attention
        if isinstance(attention, MLAttention):
            q = "wq_b" if hasattr(attention, "wq_b") else "wq"
            names = {q: "colwise", "wkv_b": "colwise", "rope_key": "grad_allreduce"}
        else:
            names = {"wq": "colwise", "wk": "colwise", "wv": "colwise"}
        names["wo"] = "rowwise_to_seq" if sp else "rowwise"
        plan.update({f"{prefix}attention.{n}": kind for n, kind in names.items()})
        if sp:
            plan[f"{prefix}attention"] = "seq_gather_input"
            if block.engram is not None:
                plan[f"{prefix}engram"] = "seq_gather_input_shard_output"
        if block.feed_forward is not None:
            ffn_path = "feed_forward"
        elif block.moe.shared_experts is not None and not sp:  # under sp: local tokens
            ffn_path = "moe.shared_experts"
        else:
            continue
        if sp:
            plan[f"{prefix}{ffn_path}"] = "seq_gather_input1"
        for n, kind in (
            ("w1", "colwise"),
            ("w3", "colwise"),
            ("w2", "rowwise_to_seq" if sp else "rowwise"),
        ):
            plan[f"{prefix}{ffn_path}.{n}"] = kind
    return plan


def sequence_local_params(model: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters that see only this rank's sequence shard under sequence parallelism
    (norms, mHC, MoE, the final merge and norm): their gradients are summed over tp."""
    modules = []
    for block in model.layers.values():
        modules += [block.attention_norm, block.ffn_norm, block.attn_hc, block.ffn_hc]
        if block.moe is not None:
            modules.append(block.moe)
    modules += [m for m in (model.merge, model.norm) if m is not None]
    return [p for m in modules for p in m.parameters()]


def validate_parallelism(
    args: ModelArgs, dims: ParallelDims, sequence_parallel: bool = False, seq_len: int = 0
) -> None:
    """Model-dependent checks, run before any process-group work (ValueError naming the field)."""
    tp, ep = dims.tp, dims.ep
    if sequence_parallel and (tp == 1 or dims.pp > 1 or (seq_len and seq_len % tp)):
        raise ValueError(
            "parallelism.sequence_parallel needs tensor_parallel_degree > 1, "
            "pipeline_parallel_degree = 1 and data.seq_len divisible by the tp degree "
            f"(tp={tp}, pp={dims.pp}, seq_len={seq_len})"
        )
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
        experts = args.moe.num_routed_experts
        per_rank = -(-experts // ep)
        checks.append(
            (
                per_rank * (ep - 1) < experts,
                f"parallelism.expert_parallel_degree={ep} leaves a rank without experts "
                f"(model.moe.num_routed_experts={experts}, {per_rank} per rank): use a degree "
                f"with ceil(E / ep) * (ep - 1) < E",
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
    if dims.cp > 1:
        checks += _context_parallel_checks(args, dims, sequence_parallel, seq_len)
    if dims.engram_shard > 1 and args.engram is None:
        checks.append((False, "parallelism.engram_shard_degree > 1 needs Engram layers"))
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _context_parallel_checks(args: ModelArgs, dims: ParallelDims, sp: bool, seq_len: int) -> list:
    cp = dims.cp
    checks = [
        (
            dims.pp == 1,
            f"parallelism.context_parallel_degree={cp} with pipeline_parallel_degree={dims.pp} "
            "is not supported; use context parallelism with data, tensor, expert and table "
            "parallelism",
        ),
        (
            not sp,
            "parallelism.sequence_parallel with context_parallel_degree > 1 is not supported; "
            "set sequence_parallel=false (tensor parallelism alone composes with it)",
        ),
    ]
    if seq_len:
        checks.append(
            (
                seq_len % (2 * cp) == 0,
                f"data.seq_len={seq_len} must be divisible by 2 * "
                f"parallelism.context_parallel_degree = {2 * cp} (two equal chunks per rank)",
            )
        )
        engram = args.engram
        if seq_len % (2 * cp) == 0 and engram is not None and engram.variant == "paper":
            halo = (engram.kernel_size - 1) * engram.max_ngram_size
            checks.append(
                (
                    seq_len // (2 * cp) >= halo,
                    f"data.seq_len={seq_len} over 2 * context_parallel_degree={2 * cp} chunks "
                    f"gives {seq_len // (2 * cp)} tokens per chunk, fewer than the Engram "
                    f"ShortConv's left context of {halo}; raise data.seq_len or lower the degree",
                )
            )
    return checks


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
