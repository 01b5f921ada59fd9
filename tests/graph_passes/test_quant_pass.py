"""The quant_linear pass: QuantLinear's activation quantization + quantized GEMM -> one omni::w8a8_linear /
omni::fp8_block_linear call (matched count, output equal to eager), and near-misses it must leave alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import omniops
from omniops.quant import quantize_model
from omniops.testing import assert_close
from tests.graph_passes._util import compile_omni, omni_ops

pytestmark = pytest.mark.compile


def _mlp(scheme: str, k: int) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(k, 96), nn.SiLU(), nn.Linear(96, 64, bias=False))
    return quantize_model(m, scheme, skip=())


# K = 200 for fp8: not a multiple of the 128 group, so the padded form of the quantizer is matched too.
@pytest.mark.parametrize(("scheme", "fused", "gemm", "k"), [
    ("int8_channel", "w8a8_linear", "w8a8_gemm", 64),
    ("fp8_block", "fp8_block_linear", "fp8_block_gemm", 200),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_fused(scheme, fused, gemm, k, dtype):
    model = _mlp(scheme, k)
    x = torch.randn(2, 5, k).to(dtype)
    _, out, rep = compile_omni(model, x)
    with torch.no_grad():
        ref = model(x)  # eager: the two-step path
    assert rep.matched["quant_linear"] == 2
    ops = omni_ops(rep)
    assert ops[fused] == 2 and ops[gemm] == 0, ops
    assert "quant_linear" not in rep.missed
    assert out.dtype == ref.dtype
    # the same codes, scales and GEMM as eager; only the summation order of Inductor's SiLU may differ
    assert_close(out, ref)


class _NearMiss(nn.Module):
    """Quantizations that look like the helpers but are not: /255 instead of /127, no rounding, fp8 without the
    clamp. Each feeds an omni GEMM, none may become a fused call (the fused op would quantize differently)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q8 = omniops.QuantLinear.from_linear(nn.Linear(64, 32), "int8_channel")
        self.qf = omniops.QuantLinear.from_linear(nn.Linear(128, 32), "fp8_block")

    def forward(self, x: torch.Tensor, xf: torch.Tensor):
        s = x.abs().amax(dim=-1, keepdim=True) / 255.0
        safe = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.round(x / safe).clamp(-127, 127).to(torch.int8)
        a = omniops.w8a8_gemm(q, s, self.q8.qweight, self.q8.scale, out_dtype=torch.float32)
        s2 = x.abs().amax(dim=-1, keepdim=True) / 127.0
        q2 = (x / torch.where(s2 == 0, torch.ones_like(s2), s2)).clamp(-127, 127).to(torch.int8)  # no round
        b = omniops.w8a8_gemm(q2, s2, self.q8.qweight, self.q8.scale, out_dtype=torch.float32)
        g = xf.reshape(*xf.shape[:-1], 1, 128)
        s3 = g.abs().amax(dim=-1) / 448.0
        q3 = (g / torch.where(s3 == 0, torch.ones_like(s3), s3)[..., None]).reshape(xf.shape)  # no clamp
        c = omniops.fp8_block_gemm(q3.to(torch.float8_e4m3fn), s3, self.qf.qweight, self.qf.weight_scale_inv,
                                   out_dtype=torch.float32)
        return a, b, c


def test_quant_linear_near_miss():
    mod = _NearMiss()
    x, xf = torch.randn(4, 64), torch.randn(4, 128)
    _, out, rep = compile_omni(mod, x, xf)
    with torch.no_grad():
        ref = mod(x, xf)
    assert rep.matched["quant_linear"] == 0
    ops = omni_ops(rep)
    assert ops["w8a8_linear"] == 0 and ops["fp8_block_linear"] == 0 and ops["w8a8_gemm"] == 2, ops
    assert ops["fp8_block_gemm"] == 1
    assert "3 x quantized GEMM left with a separate activation quantization" in rep.missed["quant_linear"]
    for o, r in zip(out, ref, strict=True):
        assert_close(o, r)


def test_quant_linear_switch_off():
    model = _mlp("int8_channel", 64)
    x = torch.randn(3, 64)
    _, out, rep = compile_omni(model, x, options={"quant_linear": False})
    assert rep.matched["quant_linear"] == 0 and omni_ops(rep)["w8a8_gemm"] == 2
    assert "switched off" in rep.missed["quant_linear"]
    with torch.no_grad():
        assert_close(out, model(x))


def test_quant_linear_dynamic_batch():
    """dynamic=True: the fp8 chain (symbolic leading dims) is still matched, one graph serves every batch size."""
    model = _mlp("fp8_block", 200)
    x = torch.randn(3, 5, 200)
    cfn, out, rep = compile_omni(model, x, dynamic=True)
    assert rep.matched["quant_linear"] == 2 and omni_ops(rep)["fp8_block_linear"] == 2
    with torch.no_grad():
        assert_close(out, model(x))
        for b in (2, 7):
            xb = torch.randn(b, 4, 200)
            assert_close(cfn(xb), model(xb))
    from omniops.graph_passes import report

    assert report().graphs == 1  # no recompilation for the other batch / sequence sizes
