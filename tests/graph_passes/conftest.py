"""The graph-pass tests count rewrites, so they need a machine-independent linear rule: the measured choice
(linear_measure, the default) depends on the CPU; test_linear_pass covers it on its own."""

from __future__ import annotations

import pytest
from omniops.graph_passes import config


@pytest.fixture(autouse=True, scope="session")
def _static_linear_rule():
    before = config.current()
    config.configure(linear_measure=False)
    yield
    config.configure(linear_measure=before.linear_measure)
