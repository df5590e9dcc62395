"""The shape of the codebase: one model (the HF export holds only glue), a pretrain/ without import
circles whose inference tools import nothing from conversion, and old module paths that still
work for one release."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MOVED = {
    "pretrain.evaluate": "pretrain.inference.evaluate",
    "pretrain.generate": "pretrain.inference.generate",
    "pretrain.probes": "pretrain.inference.probes",
    "pretrain.analyze": "pretrain.inference.analyze",
    "pretrain.convert": "pretrain.conversion.convert",
    "pretrain.dcp_stream": "pretrain.conversion.dcp_stream",
    "pretrain.simulate": "pretrain.simulation.simulate",
    "pretrain.cost_model": "pretrain.simulation.cost_model",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Project modules ``path`` imports, at any depth (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _graph(package: str) -> dict[str, set[str]]:
    modules = {
        _module_name(p): p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts
    }
    shims = set(MOVED)
    return {
        name: {m for m in _imports(path) if m in modules and m != name and m not in shims}
        for name, path in modules.items()
        if name not in shims and name != "pretrain._moved"
    }


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_pretrain_has_no_import_circle():
    graph = _graph("pretrain")
    circles = sorted(name for name in graph if name in _reach(graph, name))
    assert not circles, f"modules on an import circle: {circles}"


def test_inference_imports_nothing_from_conversion():
    graph = _graph("pretrain")
    for name in graph:
        if name.startswith("pretrain.inference"):
            bad = sorted(m for m in _reach(graph, name) if m.startswith("pretrain.conversion"))
            assert not bad, f"{name} reaches {bad}"


def test_the_hf_glue_holds_no_model_math():
    """``modeling_engram.py`` is config, PreTrainedModel and cache adapter only: the layers come
    from models/ (copied into an export by models/hf/remote_code.py)."""
    tree = ast.parse((REPO / "models" / "hf" / "modeling_engram.py").read_text())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes == {"EngramDeepseekConfig", "EngramCache", "EngramDeepseekForCausalLM"}
    calls = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    math = {"scaled_dot_product_attention", "conv1d", "rms_norm", "sigmoid", "einsum", "embedding"}
    assert not calls & math, calls & math


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_warn_and_forward(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert any(
        issubclass(w.category, FutureWarning) and MOVED[old] in str(w.message) for w in caught
    )


def test_old_command_runs_with_a_deprecation():
    out = subprocess.run(
        [sys.executable, "-m", "pretrain.generate", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert "python -m launch.generate" in out.stderr and "FutureWarning" in out.stderr
    assert out.stdout.startswith("usage: python -m launch.generate")
