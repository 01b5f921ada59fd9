"""The ``omni`` torch.compile backend (registered via the ``torch_dynamo_backends`` entry point)."""

from __future__ import annotations

from typing import Any

import torch


def omni_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any):
    """Compile with Inductor. Pattern passes onto omni ops are added by the graph-passes work."""
    from torch._inductor.compile_fx import compile_fx

    import omniops  # noqa: F401  (registers the omni ops)

    return compile_fx(gm, example_inputs, **kwargs)
