"""The remote code of an exported folder, made from the framework's own source files.

``modeling_engram.py`` (the transformers glue) imports the model from ``models/`` and the hasher
from ``data/``. An export copies the glue and every project module it reaches, transitively,
into the folder, with their project imports made relative (``from models.attention import x``
becomes ``from .attention import x``), so ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` runs the very code that trains, with only torch and transformers
installed. Nothing of the model is written twice (a second copy would drift): a change to
``models/`` reaches the next export by itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GLUE = Path(__file__).with_name("modeling_engram.py")
PACKAGES = ("models", "data")  # where exported modules may come from
_FROM = re.compile(r"^(\s*)from\s+((?:models|data)(?:\.\w+)+)\s+import\b", re.MULTILINE)


class RemoteCodeError(RuntimeError):
    """A project module that cannot travel in an exported folder."""


def _module_path(name: str) -> Path:
    path = REPO.joinpath(*name.split(".")).with_suffix(".py")
    if not path.is_file():
        raise RemoteCodeError(f"{name} is imported by the remote code but is not a module file")
    return path


def _project_imports(path: Path) -> list[str]:
    """The project modules ``path`` imports (at any depth of the file: function-level too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            bad = [n for n in names if n.split(".")[0] in PACKAGES]
            if bad:
                raise RemoteCodeError(
                    f"{path.relative_to(REPO)}: 'import {bad[0]}' cannot be made relative; "
                    f"write 'from {bad[0]} import ...'"
                )
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top not in PACKAGES:
                continue
            if node.module in PACKAGES:
                raise RemoteCodeError(
                    f"{path.relative_to(REPO)}: 'from {node.module} import "
                    f"{node.names[0].name}' cannot be made relative in a flat folder; import "
                    f"names from the module ('from {node.module}.{node.names[0].name} import ...')"
                )
            found.append(node.module)
    return found


def remote_code_modules() -> dict[str, Path]:
    """``{file name in the export: source path}``: the glue and every project module it reaches.

    Raises ``RemoteCodeError`` when one cannot travel: an import the folder's flat layout
    cannot express, or two modules of the same file name.
    """
    modules = {GLUE.name: GLUE}
    seen = {GLUE}
    todo = [GLUE]
    while todo:
        path = todo.pop()
        for name in _project_imports(path):
            target = _module_path(name)
            if target in seen:
                continue
            file_name = target.name
            if file_name in modules:
                raise RemoteCodeError(
                    f"two exported modules are both named {file_name} ({modules[file_name]} and "
                    f"{target}): rename one"
                )
            seen.add(target)
            modules[file_name] = target
            todo.append(target)
    return modules


def relative_source(path: Path) -> str:
    """``path``'s text with its project imports made relative to a flat folder."""
    return _FROM.sub(
        lambda m: f"{m.group(1)}from .{m.group(2).rsplit('.', 1)[1]} import", path.read_text()
    )


def write_remote_code(folder: str | Path) -> list[str]:
    """Write the glue and the model's modules into ``folder``; returns the file names."""
    folder = Path(folder)
    names = []
    for name, path in sorted(remote_code_modules().items()):
        (folder / name).write_text(relative_source(path))
        names.append(name)
    return names
