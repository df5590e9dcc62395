"""Deprecated path: this module moved to ``pretrain.conversion.dcp_stream``
(the old path goes in the next release)."""

from pretrain._moved import forward

forward(__name__, "pretrain.conversion.dcp_stream")
