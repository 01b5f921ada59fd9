"""Test-session setup.

* Without a GPU, Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET must be set
  before triton decorates any kernel, i.e. before omniops.triton.* is imported.
* hypothesis profiles: "ci" (default) keeps the suite inside the CI budget on 2 cores; "dev" runs more.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
