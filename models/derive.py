"""Experiment arms derived from a parameter budget, not written by hand.

The paper's three comparisons, at ladder sizes (``xs``, ``s``, ``m``):
- ``iso_flop``: the MoE ladder flavor against an Engram arm with the same total parameters and
  training FLOPs per token. The Engram arm gives up routed experts; the freed parameters become
  table rows, and Engram's key/value projections (activated compute) are paid for by a narrower
  dense FFN in the first layer, as the paper's flavors do (docs/model_flavors.md).
- ``allocation``: a fixed total and activated budget whose sparse part (the routed experts a token
  does not use) is split between experts and tables. ``rho`` is the share experts keep: 1 is pure
  MoE; lower values trade experts for rows.
- ``memory_scaling``: the iso-FLOP Engram arm's backbone fixed, tables over a 30x range of rows.

Every arm is a flavor plus ``model.overrides``; ``check`` compares it with ``models.accounting``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.accounting import Accounting, account
from models.args import ModelArgs
from models.flavors import resolve_model_args

SIZES = {
    "xs": ("ladder-moe-xs", "ladder-engram-xs"),  # a few million non-table parameters: CPU
    "s": ("ladder-moe-s", "ladder-engram-s"),
    "m": ("ladder-moe-m", "ladder-engram-m"),
}
EXPERIMENTS = ("iso_flop", "allocation", "memory_scaling")
# Engram width per n-gram order in the derived arms: a quarter of the model width keeps the
# key/value projections payable by the one dense FFN (they are (hc_mult + 1) projections)
ENGRAM_WIDTH = {"xs": 32, "s": 64, "m": 128}
MEMORY_FACTORS = (1, 3, 10, 30)  # table rows, relative to the iso-FLOP arm's
TOLERANCE = 0.01  # iso-parameter and iso-FLOP: within 1%


@dataclass
class Arm:
    """One configuration of a sweep: ``model.flavor`` plus ``model.overrides``."""

    name: str
    flavor: str
    overrides: dict = field(default_factory=dict)
    rho: float | None = None  # allocation: the share of the sparse budget experts keep
    table_rows: int = 0  # Engram rows over all layers (0: no Engram)
    measured_flops_per_token: float = 0.0  # counted on the instantiated model (``check``)

    def args(self, vocab_size: int) -> ModelArgs:
        return resolve_model_args(self.flavor, dict(self.overrides), vocab_size=vocab_size)

    def accounting(self, vocab_size: int, seq_len: int) -> Accounting:
        return account(self.args(vocab_size), seq_len)


def engram_arm(
    name: str,
    size: str,
    experts: int,
    table_params: float | None,
    vocab_size: int,
    seq_len: int,
    *,
    rows_per_head: int | None = None,
    ffn_hidden_dim: int | None = None,
) -> Arm:
    """The size's Engram flavor with ``experts`` routed experts. Its dense FFN is narrowed until
    its FLOPs per token equal the MoE flavor's (unless ``ffn_hidden_dim`` is given), and its
    tables hold about ``table_params`` (or ``rows_per_head`` rows per head)."""
    moe_flavor, engram_flavor = SIZES[size]
    base = account(resolve_model_args(moe_flavor, vocab_size=vocab_size), seq_len)
    overrides: dict = {
        "moe.num_routed_experts": experts,
        "engram.n_embed_per_ngram": ENGRAM_WIDTH[size],
    }
    probe = Arm(name, engram_flavor, {**overrides, "engram.hash.engram_vocab_size": [2, 2]})
    args = probe.args(vocab_size)
    if ffn_hidden_dim is None:
        extra = probe.accounting(vocab_size, seq_len).flops_per_token - base.flops_per_token
        dense = args.num_dense_layers
        # 6 FLOPs per matmul parameter, 3 * dim parameters per unit of dense FFN width
        ffn_hidden_dim = args.ffn_hidden_dim - round(extra / (6 * 3 * args.dim * dense))
        if ffn_hidden_dim < args.ffn_hidden_dim // 4:
            raise ValueError(
                f"{name}: paying for Engram's projections would narrow the dense FFN to "
                f"{ffn_hidden_dim}; lower ENGRAM_WIDTH[{size!r}]"
            )
    overrides["ffn_hidden_dim"] = ffn_hidden_dim
    e = args.engram
    heads = len(e.layer_ids) * e.num_heads
    if rows_per_head is None:
        bare = Arm(name, engram_flavor, {**overrides, "engram.hash.engram_vocab_size": [2, 2]})
        without = bare.accounting(vocab_size, seq_len)
        rows = (table_params - (without.total_params - without.engram_table_params)) / e.head_dim
        rows_per_head = max(2, int(rows / heads))
    overrides["engram.hash.engram_vocab_size"] = [rows_per_head] * (e.max_ngram_size - 1)
    arm = Arm(name, engram_flavor, overrides)
    arm.table_rows = arm.accounting(vocab_size, seq_len).engram_table_params // e.head_dim
    return arm


def derive(experiment: str, size: str, vocab_size: int, seq_len: int) -> list[Arm]:
    """The arms of ``experiment`` at ``size`` for a tokenizer of ``vocab_size`` ids."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment {experiment!r}: choose one of {', '.join(EXPERIMENTS)}")
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: choose one of {', '.join(SIZES)}")
    moe_flavor, engram_flavor = SIZES[size]
    moe = Arm("moe", moe_flavor, {})
    base_args = moe.args(vocab_size)
    budget = moe.accounting(vocab_size, seq_len).total_params
    experts = base_args.moe.num_routed_experts
    iso_experts = resolve_model_args(engram_flavor, vocab_size=vocab_size).moe.num_routed_experts

    def at_total(name: str, kept: int) -> Arm:
        # table parameters: the whole budget minus the arm without tables (solved in engram_arm)
        return engram_arm(name, size, kept, budget, vocab_size, seq_len)

    if experiment == "iso_flop":
        return [moe, at_total("engram", iso_experts)]
    if experiment == "allocation":
        top_k = base_args.moe.top_k
        sparse = experts - top_k  # the routed experts a token does not use
        arms = [Arm("rho=1.00", moe_flavor, {}, rho=1.0)]
        for fraction in (0.8, 0.6, 0.4, 0.2):
            kept = top_k + round(fraction * sparse)
            rho = (kept - top_k) / sparse
            arm = at_total(f"rho={rho:.2f}", kept)
            arm.rho = rho
            arms.append(arm)
        return arms
    iso = at_total("engram", iso_experts)
    first = iso.overrides["engram.hash.engram_vocab_size"][0]
    return [
        engram_arm(
            f"rows_x{factor}",
            size,
            iso_experts,
            None,
            vocab_size,
            seq_len,
            rows_per_head=first * factor,
            ffn_hidden_dim=iso.overrides["ffn_hidden_dim"],
        )
        for factor in MEMORY_FACTORS
    ]


MEASURED_TOLERANCE = 0.02  # iso arms' FLOPs as the counter measures them: within 2%


def check(
    experiment: str, arms: list[Arm], vocab_size: int, seq_len: int, measure: bool = True
) -> list[str]:
    """One line per arm (total, activated, FLOPs relative to the first arm, from
    ``models.accounting``; with ``measure`` also the FLOPs per token counted on the instantiated
    model and its parameters, ``models.flop_count``); raises when an iso-parameter or iso-FLOP
    experiment is off by more than ``TOLERANCE`` by the accounting, or its FLOPs by more than
    ``MEASURED_TOLERANCE`` by the count. Sets ``arm.measured_flops_per_token``."""
    from models.flop_count import measure as count

    ref = arms[0].accounting(vocab_size, seq_len)
    ref_measured = None
    lines = []
    for arm in arms:
        a = arm.accounting(vocab_size, seq_len)
        ratios = {
            "total": a.total_params / ref.total_params,
            "activated": a.activated_params / ref.activated_params,
            "flops": a.flops_per_token / ref.flops_per_token,
        }
        line = (
            f"{arm.name:>10}: total {a.total_params / 1e6:8.2f}M ({ratios['total']:.4f}), "
            f"activated {a.activated_params / 1e6:7.2f}M ({ratios['activated']:.4f}), "
            f"FLOPs/token {a.flops_per_token / 1e6:8.1f}M ({ratios['flops']:.4f}), "
            f"tables {a.engram_table_params / 1e6:6.2f}M"
        )
        held = ("total", "flops") if experiment != "memory_scaling" else ("activated", "flops")
        for key in held:
            if abs(ratios[key] - 1) > TOLERANCE:
                raise ValueError(
                    f"{experiment} arm {arm.name}: {key} is {ratios[key]:.4f} of the first "
                    f"arm's, beyond {TOLERANCE:.0%}; the derivation is wrong for this size"
                )
        if measure:
            m = count(arm.args(vocab_size), seq_len)
            arm.measured_flops_per_token = m.flops_per_token
            ref_measured = ref_measured or m.flops_per_token
            ratio = m.flops_per_token / ref_measured
            line += (
                f"\n{'':>10}  measured: FLOPs/token {m.flops_per_token / 1e6:8.1f}M ({ratio:.4f}; "
                f"{m.flops_per_token / a.flops_per_token:.4f} of the accounting), module "
                f"params {m.total_params / 1e6:8.2f}M ({m.total_params / a.total_params:.4f} of "
                "the accounting)"
            )
            if abs(ratio - 1) > MEASURED_TOLERANCE:
                raise ValueError(
                    f"{experiment} arm {arm.name}: its measured FLOPs per token are {ratio:.4f} "
                    f"of the first arm's, beyond {MEASURED_TOLERANCE:.0%} (models.flop_count); "
                    "the arms are not iso-FLOP as instantiated"
                )
        lines.append(line)
    return lines
