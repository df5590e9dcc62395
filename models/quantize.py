"""FP8 training through torchao: the ``[quantize]`` model converter.

What runs in FP8 (``float8_plan`` decides, ``models.summary --float8`` and the trainer's start-up
line print it):

- converted: the linears of the attention blocks (GQA's q/k/v/o, MLA's down and up
  projections) and of the dense and shared-expert MLPs, swapped for torchao's ``Float8Linear``
  (the weight stays a high-precision parameter: checkpoints, the optimizer and FSDP see no
  change);
- on request (``[quantize] engram = true``): the Engram layer's key/value GEMM, one product over
  the concatenated key and value weights. A module swap cannot reach it, so the layer's
  ``kv_matmul`` becomes ``Float8EngramMatmul``: output and weight gradient in FP8, the input
  gradient (the rows' gradient, which the row-wise optimizer reads) in high precision;
- the routed experts' grouped GEMMs (``[quantize.grouped_mm]``): torchao's FP8 rowwise grouped
  GEMM on Hopper, MXFP8 on Blackwell, each expert's token group padded to 16 rows inside the op
  (the router's loads count the tokens, not the padding). Neither has a CPU kernel for the
  rowwise recipe, so on CPU the experts stay in their own precision, said once in the log;
- never: the LM head, the router gate, norms, the hyper-connection mixers and the Engram tables,
  whose rows stay in their own precision;
- skipped: any layer whose dimensions are not multiples of 16 (FP8 GEMMs need them), or whose
  name contains one of ``filter_fqns``; listed once at INFO.

On CPU (or a GPU without FP8 tensor cores) ``emulate = "auto"`` computes the same quantised
products in high precision, which is what the CPU tests check against a hand-written reference.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from models.attention import GQAttention, MLAttention
from models.engram import Engram
from models.layers import FeedForward
from models.moe import GroupedExperts

log = logging.getLogger(__name__)

# modules whose nn.Linear children convert
CONVERTED_PARENTS = (GQAttention, MLAttention, FeedForward)
FP8_ALIGN = 16  # FP8 GEMMs need both dimensions of the weight to be multiples of 16


@dataclass
class Float8Plan:
    """Which GEMMs of a model run in FP8: module names, with the reason for each one left out."""

    linears: list[str] = field(default_factory=list)
    engram: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it stays
    fp8_params: int = 0  # weights of the converted GEMMs (linears and Engram key/value)

    def summary(self) -> str:
        """One line: what converts and how many weights those GEMMs hold."""
        parts = [f"{len(self.linears)} linears"]
        if self.engram:
            parts.append(f"{len(self.engram)} Engram key/value GEMMs")
        if self.experts:
            parts.append(f"{len(self.experts)} routed-expert groups")
        text = "FP8: " + ", ".join(parts) + f" ({self.fp8_params / 1e6:,.1f} M weights)"
        if self.skipped:
            text += f"; {len(self.skipped)} left in high precision"
        return text


def float8_plan(
    model: nn.Module, filter_fqns: list[str] = (), engram: bool = False, experts: bool = False
) -> Float8Plan:
    """The conversion list for ``model`` (on any device, meta included)."""
    plan = Float8Plan()
    for name, module in model.named_modules():
        if isinstance(module, Engram):
            widths = (module.cfg.embed_dim, module.dim)
            if not engram:
                plan.skipped[name] = "its key/value GEMM converts with quantize.engram=true"
            elif any(width % FP8_ALIGN for width in widths):
                plan.skipped[name] = f"key/value GEMM {widths} is not a multiple of {FP8_ALIGN}"
            else:
                plan.engram.append(name)
                plan.fp8_params += sum(
                    p.numel()
                    for n, p in module.named_parameters()
                    if n.endswith("proj.weight") or ("projs." in n and n.endswith("weight"))
                )
        elif isinstance(module, GroupedExperts) and experts:
            plan.experts.append(name)
        if not isinstance(module, nn.Linear):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        if not isinstance(parent, CONVERTED_PARENTS):
            continue  # the LM head, router gates, hyper-connection mixers, Engram projections
        if any(part in name for part in filter_fqns):
            plan.skipped[name] = "quantize.linear.float8.filter_fqns"
        elif module.in_features % FP8_ALIGN or module.out_features % FP8_ALIGN:
            plan.skipped[name] = (
                f"{module.in_features}x{module.out_features} is not a multiple of {FP8_ALIGN}"
            )
        else:
            plan.linears.append(name)
            plan.fp8_params += module.weight.numel()
    return plan


def import_torchao(module: str = "torchao.float8"):
    """Import a torchao module without its import-time warnings about GPU kernels this machine
    cannot load (CPU builds, no triton): they say nothing about the emulated path."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            "quantize.linear.float8.enable needs torchao: pip install -e '.[fp8]' "
            "(scripts/setup_venv.sh installs it)"
        ) from error
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def resolve_emulate(emulate) -> bool:
    """``"auto"``: emulate unless a GPU with FP8 tensor cores (compute capability 8.9+) runs."""
    if emulate != "auto":
        return bool(emulate)
    return not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9))


def linear_config(recipe: str, emulate: bool, fsdp_float8_all_gather: bool = False):
    """torchao's ``Float8LinearConfig`` for a recipe name."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(
        config, emulate=emulate, enable_fsdp_float8_all_gather=fsdp_float8_all_gather
    )


def engram_config(config):
    """``config`` with the input-gradient GEMM in high precision: the Engram rows' gradient
    feeds the row-wise optimizer as it would without FP8."""
    from torchao.float8.config import CastConfig, ScalingType

    hp = CastConfig(scaling_type=ScalingType.DISABLED)
    go = config.cast_config_grad_output
    return dataclasses.replace(
        config,
        cast_config_grad_output=dataclasses.replace(hp, target_dtype=go.target_dtype),
        cast_config_weight_for_grad_input=dataclasses.replace(
            hp, target_dtype=config.cast_config_weight.target_dtype
        ),
        cast_config_grad_output_for_grad_weight=config.cast_config_grad_output_for_grad_weight,
        enable_fsdp_float8_all_gather=False,
    )


class Float8EngramMatmul:
    """``F.linear``'s signature, computed by torchao's float8 matmul (the Engram layer's
    ``kv_matmul``)."""

    def __init__(self, config):
        from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

        self.config = config
        gemms = (config.gemm_config_output, config.gemm_config_grad_input)
        gemms += (config.gemm_config_grad_weight,)
        self.mm_config = LinearMMConfig(
            *(ScaledMMConfig(config.emulate, g.use_fast_accum, False, False) for g in gemms)
        )

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        device = x.device.type
        if torch.is_autocast_enabled(device):  # as F.linear would: both operands in that dtype
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
        out = matmul_with_hp_or_float8_args.apply(x, weight.t(), self.mm_config, self.config)
        return out if bias is None else out + bias.to(out.dtype)

    def __repr__(self) -> str:
        return "Float8EngramMatmul(grad_input in high precision)"


class Float8Converter:
    """The ``[quantize]`` converter: ``convert`` swaps the modules on the meta device before the
    model is parallelised; ``post_optimizer_hook`` precomputes the float8 all-gather's scales."""

    def __init__(self, section):
        f8 = section.linear.float8
        self.section, self.emulate = section, resolve_emulate(f8.emulate)
        self.config = linear_config(f8.recipe_name, self.emulate, f8.enable_fsdp_float8_all_gather)
        self.precompute = f8.precompute_float8_dynamic_scale_for_fsdp
        # the rowwise grouped GEMM has no emulated kernel: the experts convert on a GPU only
        self.experts = section.grouped_mm.enable and not self.emulate
        self.plan: Float8Plan | None = None

    def convert(self, model: nn.Module) -> None:
        from torchao.float8 import convert_to_float8_training

        s = self.section
        self.plan = plan = float8_plan(model, s.linear.float8.filter_fqns, s.engram, self.experts)
        chosen = set(plan.linears)
        convert_to_float8_training(
            model, config=self.config, module_filter_fn=lambda _, name: name in chosen
        )
        if plan.engram:
            matmul = Float8EngramMatmul(engram_config(self.config))
            for name in plan.engram:
                model.get_submodule(name).kv_matmul = matmul
        if plan.experts:
            self._convert_experts(model, plan.experts)
        elif s.grouped_mm.enable:
            log.info(
                "quantize.grouped_mm: the routed experts stay in high precision here (torchao's "
                "%s grouped GEMM needs a GPU with FP8 tensor cores)",
                s.grouped_mm.recipe_name,
            )
        for name, why in plan.skipped.items():
            log.info("FP8: %s stays in high precision (%s)", name, why)
        log.info(
            "%s; recipe %s%s",
            plan.summary(),
            s.linear.float8.recipe_name,
            " (emulated)" if self.emulate else "",
        )

    def _convert_experts(self, model: nn.Module, names: list[str]) -> None:
        for name in names:
            self.convert_experts(model.get_submodule(name))

    def convert_experts(self, experts: GroupedExperts) -> None:
        """Wrap the experts' weights for torchao's FP8 grouped GEMM; the module pads each
        expert's rows to 16 itself (torchao 0.18 leaves that to the caller)."""
        from torchao.quantization import quantize_

        configs = import_torchao("torchao.prototype.moe_training.config")
        if self.section.grouped_mm.recipe_name == "mxfp8":  # 32-element scale blocks
            config, multiple = configs.MXFP8TrainingOpConfig(), 32
        else:
            config, multiple = configs.Float8TrainingOpConfig(), FP8_ALIGN
        quantize_(experts, config=config, filter_fn=lambda module, _: module is experts)
        experts.group_multiple = multiple
        experts.reconvert = self.convert_experts

    def post_optimizer_hook(self, model: nn.Module) -> None:
        if self.precompute:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            precompute_float8_dynamic_scale_for_fsdp(model)


def quantize_identity(section) -> str:
    """What a checkpoint records of ``[quantize]``: "none", or the recipe and what it covers."""
    f8 = section.linear.float8
    if not f8.enable:
        return "none"
    covered = ["linears", *(["engram"] if section.engram else [])]
    covered += ["experts"] if section.grouped_mm.enable else []
    return f"{f8.recipe_name} ({', '.join(covered)})"


def build_quantize_converter(section) -> Float8Converter | None:
    """The ``quantize`` section's converter, or None when FP8 is off."""
    if not section.linear.float8.enable:
        return None
    import_torchao()
    return Float8Converter(section)
