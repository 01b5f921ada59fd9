"""The pattern-matcher passes (graph_passes/patterns.py: residual add + RMSNorm, RMSNorm, SiLU-and-mul, its split
form) on small hand-written modules: what they match (counts), that the result equals eager, near-misses they must
leave alone, min_rows. One compile per dtype for the norm/activation passes (Inductor is slow here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniops.testing import assert_close
from tests.graph_passes._util import compile_omni, omni_ops

pytestmark = pytest.mark.compile


def hf_rms(x, w, eps):
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def block(x, res, w, w32, gu, gu2):
    s = res + x
    a = hf_rms(s, w, 1e-5)  # residual add + RMSNorm -> fused_add_rms_norm
    b = hf_rms(a, w, 1e-6)  # RMSNorm -> rms_norm
    gate, up = gu.chunk(2, dim=-1)
    c = F.silu(gate) * up  # merged SiLU-and-mul -> silu_and_mul
    # near-misses: RMSNorm without epsilon; a different activation; weight in another dtype than x
    h = b.float()
    d = (w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True))).to(b.dtype))
    g2, u2 = gu2.chunk(2, dim=-1)
    e = F.gelu(g2) * u2
    f = hf_rms(b, w32, 1e-6).to(b.dtype) if x.dtype != torch.float32 else b
    return a, b, c, d, e, f, s * 2


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x, res = (torch.randn(3, 24, 64, generator=g).to(dtype) for _ in range(2))  # 72 rows >= min_rows
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
    gu, gu2 = (torch.randn(3, 24, 96, generator=g).to(dtype) for _ in range(2))
    return x, res, w, w.float(), gu, gu2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_activation_passes(dtype):
    args = _inputs(dtype)
    _, out, rep = compile_omni(block, *args)
    ref = block(*args)
    for o, r in zip(out, ref, strict=True):
        assert_close(o, r)
    assert rep.matched["fused_add_rms_norm"] == 1
    assert rep.matched["rms_norm"] == 1
    assert rep.matched["silu_and_mul"] == 1
    ops = omni_ops(rep)
    assert ops["fused_add_rms_norm"] == 1 and ops["rms_norm"] == 1 and ops["silu_and_mul"] == 1, ops
    # the near-misses stay as they are, and the report says so
    assert "rms_norm" in rep.missed


def test_passes_switch_off(capsys):
    args = _inputs(torch.float32)
    _, out, rep = compile_omni(block, *args, options={"rms_norm": False, "fused_add_rms_norm": False,
                                                      "silu_and_mul": False, "log": True})
    assert sum(rep.matched.values()) == 0 and not rep.ops
    for o, r in zip(out, block(*args), strict=True):
        assert_close(o, r)
    assert "switched off" in rep.missed["rms_norm"]
    assert "omni passes: 1 graph(s) rewritten" in capsys.readouterr().out  # log=True (or OMNI_LOG=passes)


def test_min_rows_leaves_decode_sized_norms_to_inductor():
    # 3 x 5 = 15 rows: below the default min_rows (64) on CPU, so nothing is rewritten; min_rows=0 rewrites
    g = torch.Generator().manual_seed(2)
    x, res, w = torch.randn(3, 5, 64, generator=g), torch.randn(3, 5, 64, generator=g), torch.randn(64, generator=g)

    def f(x, res, w):
        s = res + x
        return hf_rms(s, w, 1e-6), s

    _, out, rep = compile_omni(f, x, res, w)
    assert not rep.ops and "min_rows=64" in rep.missed["rms_norm"]
    _, out0, rep0 = compile_omni(f, x, res, w, options={"min_rows": 0})
    assert rep0.ops["fused_add_rms_norm"] == 1
    for a, b, r in zip(out, out0, f(x, res, w), strict=True):
        assert_close(a, r)
        assert_close(b, r)


def split_mlp(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def split_near_miss(x, wg, wu, wd):
    return F.linear(F.relu(F.linear(x, wg)) * F.linear(x, wu), wd)


def test_silu_and_mul_split_form():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 32, generator=g)
    wg, wu, wd = torch.randn(48, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(32, 48, generator=g)
    _, out, rep = compile_omni(split_mlp, x, wg, wu, wd, options={"silu_and_mul_split": True})
    assert rep.matched["silu_and_mul_split"] == 1 and rep.ops["silu_and_mul"] == 1
    assert_close(out, split_mlp(x, wg, wu, wd), scale=4)
    _, out, rep = compile_omni(split_near_miss, x, wg, wu, wd, options={"silu_and_mul_split": True})
    assert rep.matched["silu_and_mul_split"] == 0 and not rep.ops
    assert_close(out, split_near_miss(x, wg, wu, wd), scale=4)
