"""Deprecated path: this module moved to ``pretrain.simulation.cost_model``
(the old path goes in the next release)."""

from pretrain._moved import forward

forward(__name__, "pretrain.simulation.cost_model")
