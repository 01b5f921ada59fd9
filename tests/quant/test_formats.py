"""Quantize / dequantize helpers: documented layouts, round-trip error bounds, zero rows, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from omniops import _ext
from omniops.quant import formats as F

N_ST = st.integers(1, 140)
W_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@given(n=N_ST, k=st.integers(1, 300), dtype=W_DTYPES)
def test_int8_channel_round_trip(n, k, dtype) -> None:
    w = (torch.randn(n, k) * 3).to(dtype)
    q = F.quantize_weight(w, "int8_channel")
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (n, k) and q.scale.shape == (n,)
    assert q.qweight.abs().max() <= 127
    err = (F.dequantize_weight(q) - w.float()).abs()
    # Round to nearest: at most half a step per element (plus fp32 rounding of the division).
    assert (err <= q.scale[:, None] * (0.5 + 1e-5)).all()


@given(n=N_ST, groups=st.integers(1, 4), g=st.sampled_from([32, 64, 128]), sym=st.booleans(), dtype=W_DTYPES)
def test_int4_group_round_trip(n, groups, g, sym, dtype) -> None:
    k = groups * g
    w = (torch.randn(n, k) + (0 if sym else 0.7)).to(dtype)
    q = F.quantize_weight(w, "int4_group", group_size=g, symmetric=sym)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (n, k // 2)
    assert q.scales.shape == (n, k // g) and q.scales.dtype == torch.float32
    assert (q.zeros is None) == sym
    if not sym:
        assert q.zeros.dtype == torch.uint8 and q.zeros.max() <= 15
    err = (F.dequantize_weight(q) - w.float()).abs().reshape(n, k // g, g)
    # Half a step per element, also at the clamped ends (symmetric: amax maps to 7.5; asymmetric: see the
    # zero-point rounding argument in formats.py).
    assert (err <= q.scales[..., None] * (0.5 + 1e-5) + 1e-7).all()


def test_int4_packing_is_documented_layout() -> None:
    """Low nibble = even k, high nibble = odd k; symmetric codes are offset-binary (value + 8)."""
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = F.pack_int4(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(F.unpack_int4(packed), codes)
    w = torch.tensor([[-7.5, 7.5, 1.0] + [0.0] * 29])
    q = F.quantize_weight(w, "int4_group", group_size=32, symmetric=True)
    assert q.scales.item() == pytest.approx(1.0)
    assert F.unpack_int4(q.packed)[0, :4].tolist() == [0, 15, 9, 8]  # -8 (half to even) .. 7 (clamped), 1, 0


@given(n=st.integers(1, 300), k=st.integers(1, 300))
def test_fp8_block_round_trip(n, k) -> None:
    w = torch.randn(n, k) * 0.05
    q = F.quantize_weight(w, "fp8_block")
    assert q.qweight.dtype == torch.float8_e4m3fn and q.qweight.shape == (n, k)
    assert q.scale.shape == (math.ceil(n / 128), math.ceil(k / 128))
    s = F._expand_blocks(q.scale, n, k)
    err = (F.dequantize_weight(q) - w).abs()
    # e4m3: 3 mantissa bits (relative 2**-4 half-ulp), subnormal spacing 2**-9 (absolute 2**-10 * scale).
    assert (err <= w.abs() * 2**-4 + s * 2**-10 + 1e-12).all()
    assert q.qweight.float().abs().max() <= F.FP8_MAX


@given(m=st.integers(1, 50), k=st.integers(1, 400))
def test_activation_quantizers_round_trip(m, k) -> None:
    x = torch.randn(2, m, k)
    xq, xs = F.quantize_activation_per_token_int8(x)
    assert xq.dtype == torch.int8 and xs.shape == (2, m, 1)
    assert ((xq.float() * xs - x).abs() <= xs * (0.5 + 1e-5)).all()
    fq, fs = F.quantize_activation_fp8_group(x)
    assert fq.shape == x.shape and fs.shape == (2, m, math.ceil(k / 128))
    back = F.dequantize_activation_fp8_group(fq, fs)
    assert ((back - x).abs() <= x.abs() * 2**-4 + fs.repeat_interleave(128, -1)[..., :k] * 2**-10 + 1e-12).all()


def test_zero_rows_and_groups_never_nan() -> None:
    w = torch.zeros(3, 256)
    w[1] = torch.randn(256)
    for scheme, kw in [("int8_channel", {}), ("int4_group", {"symmetric": True}),
                       ("int4_group", {"symmetric": False}), ("fp8_block", {})]:
        q = F.quantize_weight(w, scheme, **kw)
        d = F.dequantize_weight(q)
        assert torch.isfinite(d).all(), scheme
        assert (d[0] == 0).all() and (d[2] == 0).all(), scheme
    x = torch.zeros(2, 130)
    for xq, xs in (F.quantize_activation_per_token_int8(x), F.quantize_activation_fp8_group(x)):
        assert (xs == 0).all() and (xq.float() == 0).all()


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: F.quantize_weight(torch.randn(4, 96), "int4_group", group_size=64), ValueError, "multiple of"),
        (lambda: F.quantize_weight(torch.randn(4, 96), "int4_group", group_size=48), ValueError, "group_size"),
        (lambda: F.quantize_weight(torch.randn(4, 64), "int5"), ValueError, "scheme"),
        (lambda: F.quantize_weight(torch.randn(64), "int8_channel"), ValueError, "2-D"),
        (lambda: F.quantize_weight(torch.ones(4, 64, dtype=torch.int8), "int8_channel"), TypeError, "float"),
        (lambda: F.quantize_activation_fp8_group(torch.randn(2, 64), group=64), ValueError, "group"),
        (lambda: F.quantize_activation_per_token_int8(torch.ones(2, 3, dtype=torch.int32)), TypeError, "x"),
        (lambda: F.dequantize_weight(torch.randn(2, 2)), TypeError, "qw"),
    ],
)
def test_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@given(m=st.integers(0, 40), k=st.integers(1, 700), zero_row=st.booleans())
def test_fused_int8_quantizer_matches_torch_ops(dtype, m, k, zero_row) -> None:
    """The one-pass C++ quantizer (eager CPU) equals the torch-op formulation it replaces."""
    x = (torch.randn(m, k) * 5).to(dtype)
    if zero_row and m:
        x[0] = 0
    q, s = F.quantize_activation_per_token_int8(x)  # C++ path
    xf = x.float()
    s_ref = xf.abs().amax(dim=-1, keepdim=True) / 127.0 if m else torch.zeros(0, 1)
    q_ref = torch.round(xf / F._safe(s_ref)).clamp(-127, 127).to(torch.int8)
    assert q.shape == x.shape and s.shape == (m, 1)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert torch.equal(q, q_ref)


@pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")
def test_fused_int8_quantizer_rejects_bad_input() -> None:
    C = _ext.cpp()
    with pytest.raises(TypeError, match="x: expected float32"):
        C.quantize_per_token_int8(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        C.quantize_per_token_int8(torch.ones(3))
    with pytest.raises(ValueError, match="x"):
        C.quantize_per_token_int8(torch.ones(4, 3).t())
