"""Old module paths of moved modules, kept for one release (they warn, then forward)."""

from __future__ import annotations

import importlib
import sys
import warnings


def forward(old: str, new: str, command: str | None = None) -> None:
    """Make module ``old`` the module ``new`` (run as ``python -m old``: run ``new``'s ``main``).

    ``command``: the command line that replaces ``python -m old``, named in the warning.
    """
    target = importlib.import_module(new)
    use = command or f"import {new}"
    name = sys.modules["__main__"].__spec__.name if old == "__main__" else old
    warnings.warn(
        f"{name} moved to {new}; use {use} (the old path goes in the next release)",
        FutureWarning,
        stacklevel=3,
    )
    if old == "__main__":
        sys.exit(target.main())
    sys.modules[old] = target
