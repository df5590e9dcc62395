"""The gloo rank pools of ``helpers.run_ranks`` live for one test module."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _rank_pools_per_module():
    yield
    from tests.distributed.helpers import close_pools

    close_pools()
