"""Each op under torch.compile (Inductor): compiled == eager, and the op stays one node in the graph.
Shapes are tiny and all ops share one compiled function: Inductor compiles take ~15 s on 2 cores."""

from __future__ import annotations

import pytest
import torch

import omniops

pytestmark = pytest.mark.compile


def _block(x, res, w, positions, cache):
    h, res = omniops.rms_norm(x, w, 1e-6, res)
    h2 = omniops.rms_norm(h, w, 1e-6)
    a = omniops.silu_and_mul(torch.cat((h2, h2 * 0.5), dim=-1))
    q, k = omniops.rotary_embedding(positions, a, h, cache, 16)
    return q + k, res


def test_ops_under_torch_compile() -> None:
    counts: dict[str, int] = {}

    def count_backend(gm: torch.fx.GraphModule, example_inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function" and str(n.target).startswith("omni."):
                counts[str(n.target)] = counts.get(str(n.target), 0) + 1
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    x, res, w = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    positions = torch.arange(5)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    f = torch.arange(8)[:, None].float() * inv
    cache = torch.cat((f.cos(), f.sin()), -1)
    eager = _block(x, res, w, positions, cache)
    compiled = torch.compile(_block, backend=count_backend, fullgraph=True)(x, res, w, positions, cache)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e)
    assert counts == {"omni.fused_add_rms_norm.default": 1, "omni.rms_norm.default": 1,
                      "omni.silu_and_mul.default": 1, "omni.rotary_embedding.default": 1}
