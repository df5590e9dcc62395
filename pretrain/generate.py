"""Deprecated path: this module moved to ``pretrain.inference.generate``
(the old path goes in the next release)."""

from pretrain._moved import forward

forward(__name__, "pretrain.inference.generate", "python -m launch.generate")
