"""Deprecated path: this module moved to ``pretrain.simulation.simulate``
(the old path goes in the next release)."""

from pretrain._moved import forward

forward(__name__, "pretrain.simulation.simulate")
