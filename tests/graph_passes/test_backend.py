"""The omni backend itself (graph_passes/backend.py, config.py): entry-point registration, the pass uuid, option
checks, the prepare() hint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.graph_passes._util import compile_omni

pytestmark = pytest.mark.compile


def test_backend_registered_without_importing_omniops():
    code = ("import torch\n"
            "from torch._dynamo.backends.registry import lookup_backend\n"
            "import sys\n"
            "assert 'omniops' not in sys.modules\n"
            "fn = lookup_backend('omni')\n"
            "print(fn.__module__, fn.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["omniops.graph_passes.backend", "omni_backend"]


def test_pass_uuid_tracks_config():
    from omniops.graph_passes import OmniGraphPass, PassConfig

    a, b = OmniGraphPass(PassConfig()), OmniGraphPass(PassConfig(rms_norm=False))
    assert a.uuid() == OmniGraphPass(PassConfig()).uuid() != b.uuid()


def test_unknown_option_rejected():
    with pytest.raises(Exception, match="unknown option"):
        compile_omni(lambda x: x + 1, torch.ones(2), options={"no_such_pass": True})


def test_prepare_hint_said_once():
    import logging

    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)
    from omniops.graph_passes import backend

    g = torch.fx.Graph()
    x, w, offs = g.placeholder("x"), g.placeholder("w"), g.placeholder("offs")
    g.output(g.call_function(torch.ops.transformers.grouped_mm_fallback.default, (x, w, offs)))
    gm = torch.fx.GraphModule({}, g)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    backend.log.addHandler(handler)
    try:
        backend._HINTED = False
        backend._hint_prepare(gm)
        backend._hint_prepare(gm)
    finally:
        backend.log.removeHandler(handler)
    assert sum("prepare(model)" in m for m in seen) == 1
