"""Deprecated path: this module moved to ``pretrain.inference.analyze``
(the old path goes in the next release)."""

from pretrain._moved import forward

forward(__name__, "pretrain.inference.analyze", "python -m launch.analyze")
