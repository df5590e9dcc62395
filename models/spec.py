"""Model families behind ``model.family``: what a job builds, parallelises and exports.

A ``ModelSpec`` names the parts of one family, as torchtitan's ``TrainSpec`` does: the model
class (built on the meta device from its ``ModelArgs``), the named flavors and how a job's
``[model]`` section becomes ``ModelArgs``, the layout checks and the parallelize function, the
HF export layouts, and the model converters (FP8 and the like) that rewrite modules before the
model is parallelised. The trainer, the dry run and the tools look a family up here and import
none of its modules by name.

``deepseek_engram`` (the DeepSeek-style MoE backbone with Engram layers) is registered below; a
new family registers its own spec with ``register_model_spec``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from models.args import ModelArgs
from models.flavors import FLAVORS, resolve_model_args
from models.parallel_plans import validate_parallelism
from models.parallelize import parallelize_deepseek_engram
from models.quantize import build_quantize_converter
from models.transformer import Transformer


class ModelConverter(Protocol):
    """Rewrites a model's modules in place on the meta device, before parallelisation (FP8
    linears, for one), and acts after each optimizer step where its state needs it."""

    def convert(self, model: nn.Module) -> None: ...

    def post_optimizer_hook(self, model: nn.Module) -> None: ...


# a converter's factory gets its own config section and returns None when the section leaves
# the converter off
ConverterFactory = Callable[[Any], ModelConverter | None]


@dataclass(frozen=True)
class ModelSpec:
    """One model family.

    Attributes:
        name: the ``model.family`` value.
        model_cls: ``model_cls(args)`` builds the model (under ``torch.device("meta")``).
        flavors: the named sizes, ``model.flavor``.
        resolve_args: ``[model]`` (flavor, overrides, vocab and sequence sizes) -> ``ModelArgs``.
        validate_parallelism: ``(args, dims, sequence_parallel, seq_len)``; raises ValueError.
        parallelize: ``(model, dims, mesh, device, seed, **options) -> (model, inner, plan)``.
        export_layouts: the HF layouts ``launch.convert dcp-to-hf --layout`` can write.
        converters: config section name -> factory of a ``ModelConverter``.
    """

    name: str
    model_cls: Callable[[ModelArgs], nn.Module]
    flavors: Mapping[str, Callable[[], ModelArgs]]
    resolve_args: Callable[..., ModelArgs]
    validate_parallelism: Callable[..., None]
    parallelize: Callable[..., tuple]
    export_layouts: tuple[str, ...] = ()
    converters: Mapping[str, ConverterFactory] = field(default_factory=dict)

    def build_converters(self, sections: Callable[[str], Any]) -> list[ModelConverter]:
        """The converters a job turns on; ``sections(name)`` gives a config section."""
        made = (factory(sections(name)) for name, factory in self.converters.items())
        return [converter for converter in made if converter is not None]


_SPECS: dict[str, ModelSpec] = {}


def register_model_spec(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` selectable as ``model.family = spec.name``."""
    if spec.name in _SPECS:
        raise ValueError(f"model family {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def unregister_model_spec(name: str) -> None:
    _SPECS.pop(name, None)


def model_families() -> list[str]:
    return sorted(_SPECS)


def get_model_spec(family: str) -> ModelSpec:
    """The spec of ``model.family``; a ValueError names the registered ones."""
    if family not in _SPECS:
        raise ValueError(
            f"model.family={family!r} is not a registered model family; use one of "
            f"{', '.join(model_families())} (models.spec.register_model_spec adds one)"
        )
    return _SPECS[family]


register_model_spec(
    ModelSpec(
        name="deepseek_engram",
        model_cls=Transformer,
        flavors=FLAVORS,
        resolve_args=resolve_model_args,
        validate_parallelism=validate_parallelism,
        parallelize=parallelize_deepseek_engram,
        export_layouts=("engram", "deepseek_v3"),
        converters={"quantize": build_quantize_converter},
    )
)
