"""The shape of the codebase, read from the source with ``ast``: imports flow one way
(``data/`` <- ``parallel/`` <- ``models/`` <- ``pretrain/`` <- ``launch/``, ``benchmarks/`` on
top), no import circle anywhere (type-only imports included), a ``pretrain/`` that keeps its
top level to the training job, every command line that reads a job config in ``launch/``, and
one model (the HF export holds only glue)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "parallel", "models", "pretrain", "launch", "benchmarks")
LEVEL = {name: i for i, name in enumerate(PACKAGES)}  # a package imports only lower levels
MAX_PRETRAIN_TOP = 14  # pretrain/'s own modules, __init__ included; new parts go in subpackages


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }


def _imports(name: str, path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth (lazy and ``TYPE_CHECKING`` imports
    count too), relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {m for m in _imports(name, path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _circles(graph: dict[str, set[str]]) -> list[str]:
    return sorted(name for name in graph if name in _reach(graph, name))


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{name} -> {target}"
        for name, targets in graph.items()
        for target in sorted(targets)
        if LEVEL[target.split(".")[0]] > LEVEL[name.split(".")[0]]
    ]


def test_no_import_circle_anywhere():
    circles = _circles(_graph())
    assert not circles, f"modules on an import circle: {circles}"


def test_imports_flow_one_way():
    upward = _upward(_graph())
    assert not upward, "imports against the flow data <- parallel <- models <- pretrain <- " + (
        "launch <- benchmarks:\n" + "\n".join(upward)
    )


def test_the_checks_see_a_planted_circle_and_an_upward_import():
    """The graph holds real edges (lazy and type-only ones too), and a circle or an upward
    import planted in a copy of it is found."""
    graph = _graph()
    assert {"pretrain.config", "pretrain.step"} <= graph["pretrain.train"]
    assert "models.kv_cache" in graph["models.engram"]  # a TYPE_CHECKING import
    planted = {**graph, "models.args": graph["models.args"] | {"models.transformer"}}
    assert "models.args" in _circles(planted)
    planted = {**graph, "data.loader": graph["data.loader"] | {"pretrain.config"}}
    assert _upward(planted) == ["data.loader -> pretrain.config"]


def test_inference_imports_nothing_from_conversion():
    graph = _graph()
    for name in graph:
        if name.startswith("pretrain.inference"):
            bad = sorted(m for m in _reach(graph, name) if m.startswith("pretrain.conversion"))
            assert not bad, f"{name} reaches {bad}"


def test_pretrain_keeps_its_top_level_to_the_job():
    top = sorted(p.name for p in (REPO / "pretrain").glob("*.py"))
    assert len(top) <= MAX_PRETRAIN_TOP, f"pretrain/ has {len(top)} top-level modules: {top}"


def _reads_a_job_config(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    parses = any(
        isinstance(node, ast.Attribute) and node.attr == "ArgumentParser" for node in ast.walk(tree)
    )
    return parses and "pretrain.config" in _imports(_module_name(path), path)


def test_command_lines_that_read_a_job_config_live_in_launch():
    """``pretrain.train`` is the training job itself; every other command line that parses
    arguments and reads a job config is a ``launch/`` entry."""
    outside = sorted(
        name
        for name, path in _modules().items()
        if name.split(".")[0] in ("data", "parallel", "models", "pretrain")
        and name != "pretrain.train"
        and _reads_a_job_config(path)
    )
    assert not outside, f"command lines outside launch/: {outside}"


@pytest.mark.parametrize("package", ["pretrain/inference", "data", "models"])
def test_no_argument_parsing_below_launch(package):
    """Checkpoint tools and data tools keep their library functions where they are; their
    argument parsing is in ``launch/`` (``data.prepare`` and ``models.summary`` stay with the
    part they describe: they read no job config)."""
    allowed = {"data.prepare", "models.summary"}
    parsers = sorted(
        _module_name(p)
        for p in (REPO / package).rglob("*.py")
        if "argparse" in _imports(_module_name(p), p) and _module_name(p) not in allowed
    )
    assert not parsers, f"argument parsing outside launch/: {parsers}"


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


def test_no_pointer_outside_the_repository():
    """Code, tests and docs stand on their own: no reference to a style file beside the
    checkout."""
    marker = "../" + "STYLE"
    hits = [
        str(p.relative_to(REPO))
        for pattern in ("*.py", "*.md", "*.sh", "*.toml")
        for p in REPO.rglob(pattern)
        if ".venv" not in p.parts and ".git" not in p.parts and marker in p.read_text()
    ]
    assert not hits, hits
