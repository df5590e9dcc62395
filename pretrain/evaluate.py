"""Deprecated path: this module moved to ``pretrain.inference.evaluate``
(the old path goes in the next release)."""

from pretrain._moved import forward

forward(__name__, "pretrain.inference.evaluate", "python -m launch.evaluate")
