"""Quantized GEMMs (w8a8, w4a16, fp8_block): every backend vs the reference, exact int32 accumulation, DeepSeek-V3
fp8 layout, errors through Python and straight into _C, opcheck, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniops
from omniops import _ext
from omniops.quant.formats import (
    quantize_activation_fp8_group,
    quantize_activation_per_token_int8,
    quantize_weight,
)
from omniops.reference import quant_gemm as ref
from omniops.testing import assert_close
from tests.ops._cases import BACKEND_CASES, DTYPES, Case, skip_unsupported, strided

# Sizes around the kernels' tiles: CPU int8 tile 4 x 2 rows, K step 16 (AVX2) / 32 (VNNI), 64 weight rows per
# tile; CPU dequant tile 16 weight rows x 512 of K; Triton 16..64 x 64 x 64 (fp8: K step 128).
M_ST = st.one_of(st.integers(1, 9), st.sampled_from([16, 33, 64, 129, 300]))
N_ST = st.sampled_from([1, 2, 7, 16, 63, 64, 65, 130])
K8_ST = st.sampled_from([1, 15, 16, 17, 31, 64, 100, 257, 600])
KF8_ST = st.sampled_from([1, 7, 64, 128, 129, 300, 640])


def _scale(k: int) -> float:
    """Tolerance multiplier for fp32 dot products of length k (summation order differs between backends)."""
    return max(1.0, math.sqrt(k) / 4)


def _lead(m: int, lead3: bool) -> tuple[int, ...]:
    return (1, m) if lead3 else (m,)


# ---- W8A8 -------------------------------------------------------------------------------------------------
def _out_dtypes(case: Case, dtypes: list[torch.dtype]) -> st.SearchStrategy:
    """Output dtypes this case can check: bf16 Triton runs only on a GPU (see skip_unsupported). Drawn per example
    rather than skipped, because a pytest.skip inside one hypothesis example skips the whole test."""
    interp = case.backend == "triton" and case.device == "cpu"
    return st.sampled_from([d for d in dtypes if not (interp and d == torch.bfloat16)])


@pytest.mark.parametrize("case", BACKEND_CASES)
@given(m=M_ST, n=N_ST, k=K8_ST, bias=st.booleans(), lead3=st.booleans(), data=st.data())
def test_w8a8_matches_reference(case: Case, m, n, k, bias, lead3, data) -> None:
    out = data.draw(_out_dtypes(case, [torch.float32, torch.float16, torch.bfloat16, torch.int32]))
    x = torch.randn(*_lead(m, lead3), k, device=case.device)
    qw = quantize_weight(torch.randn(n, k, device=case.device), "int8_channel")
    x_q, x_s = quantize_activation_per_token_int8(x)
    b = torch.randn(n, device=case.device).to(out) if bias and out != torch.int32 else None
    expected = ref.w8a8_gemm(x_q.reshape(-1, k), x_s.reshape(-1), qw.qweight, qw.scale, b, out)
    with case.active():
        got = omniops.w8a8_gemm(x_q, x_s, qw.qweight, qw.scale, b, out_dtype=out)
    assert got.shape == (*x.shape[:-1], n) and got.dtype == out
    got = got.reshape(-1, n)
    if out == torch.int32:
        assert torch.equal(got, expected)
    else:
        assert_close(got, expected)


@pytest.mark.parametrize("case", BACKEND_CASES)
@given(m=st.integers(1, 40), n=st.sampled_from([1, 3, 64, 67]), k=st.sampled_from([1, 16, 33, 1000, 4100]),
       extreme=st.booleans())
@settings(max_examples=10)
def test_w8a8_int32_accumulation_is_exact(case: Case, m, n, k, extreme) -> None:
    """The integer part bit for bit against an int64 reference, including -128 x -128 everywhere."""
    if extreme:
        x_q = torch.full((m, k), -128, dtype=torch.int8, device=case.device)
        w_q = torch.full((n, k), -128, dtype=torch.int8, device=case.device)
        w_q[::2] = 127
    else:
        x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=case.device)
        w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=case.device)
    ones_m, ones_n = torch.ones(m, 1, device=case.device), torch.ones(n, device=case.device)
    with case.active():
        got = omniops.w8a8_gemm(x_q, ones_m, w_q, ones_n, out_dtype=torch.int32)
    assert torch.equal(got.long(), ref.w8a8_accumulate(x_q, w_q))


def test_w8a8_max_k_is_exact() -> None:
    """K = 131071 with every product 128 * 128: the largest sum int32 still holds."""
    k = 131071
    x_q = torch.full((2, k), -128, dtype=torch.int8)
    w_q = torch.full((3, k), -128, dtype=torch.int8)
    for case in [c.values[0] for c in BACKEND_CASES if c.values[0].backend != "triton"]:
        with case.active():
            got = omniops.w8a8_gemm(x_q, torch.ones(2, 1), w_q, torch.ones(3), out_dtype=torch.int32)
        assert torch.equal(got.long(), torch.full((2, 3), k * 16384, dtype=torch.long)), case.id


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_w8a8_zero_rows_give_zeros(case: Case) -> None:
    """An all-zero activation row / weight row has scale 0: the output is 0 (+bias), never NaN."""
    x = torch.randn(4, 64, device=case.device)
    x[1] = 0
    w = torch.randn(5, 64, device=case.device)
    w[2] = 0
    qw = quantize_weight(w, "int8_channel")
    x_q, x_s = quantize_activation_per_token_int8(x)
    assert x_s[1].item() == 0 and qw.scale[2].item() == 0
    with case.active():
        y = omniops.w8a8_gemm(x_q, x_s, qw.qweight, qw.scale, out_dtype=torch.float32)
    assert torch.isfinite(y).all() and (y[1] == 0).all() and (y[:, 2] == 0).all()


# ---- W4A16 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@given(m=M_ST, n=N_ST, groups=st.integers(1, 5), g=st.sampled_from([32, 64, 128]), sym=st.booleans(),
       bias=st.booleans(), layout=st.sampled_from(["contiguous", "rows", "transposed"]))
def test_w4a16_matches_reference(case: Case, dtype, m, n, groups, g, sym, bias, layout) -> None:
    skip_unsupported(case, dtype, uses_dot=True)
    k = groups * g
    x = torch.randn(m, k, device=case.device).to(dtype)
    qw = quantize_weight(torch.randn(n, k, device=case.device), "int4_group", group_size=g, symmetric=sym)
    b = torch.randn(n, device=case.device).to(dtype) if bias else None
    expected = ref.w4a16_gemm(x, qw.packed, qw.scales, qw.zeros, g, b)
    with case.active():
        got = omniops.w4a16_gemm(strided(x, layout), qw.packed, qw.scales, qw.zeros, g, b)
    assert got.shape == (m, n) and got.dtype == dtype
    # Triton's fp16 dot takes the dequantized weight rounded to fp16 (the tensor-core operand): one more
    # rounding per product than the fp32-weight reference.
    extra = 4.0 if case.backend == "triton" and dtype == torch.float16 else 1.0
    assert_close(got, expected, scale=_scale(k) * extra)


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_w4a16_zero_groups(case: Case) -> None:
    w = torch.randn(3, 128, device=case.device)
    w[1, :64] = 0
    for sym in (True, False):
        qw = quantize_weight(w, "int4_group", group_size=64, symmetric=sym)
        assert qw.scales[1, 0].item() == 0
        x = torch.randn(2, 128, device=case.device)
        with case.active():
            y = omniops.w4a16_gemm(x, qw.packed, qw.scales, qw.zeros, 64)
        assert torch.isfinite(y).all()
        assert_close(y, ref.w4a16_gemm(x, qw.packed, qw.scales, qw.zeros, 64, None), scale=_scale(128))


# ---- FP8 block --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", BACKEND_CASES)
@given(m=M_ST, n=st.sampled_from([1, 7, 128, 129, 200]), k=KF8_ST, bias=st.booleans(), data=st.data(),
       lead3=st.booleans())
def test_fp8_block_matches_reference(case: Case, m, n, k, bias, data, lead3) -> None:
    out = data.draw(_out_dtypes(case, [torch.float32, torch.float16, torch.bfloat16]))
    x = torch.randn(*_lead(m, lead3), k, device=case.device)
    qw = quantize_weight(torch.randn(n, k, device=case.device), "fp8_block")
    x_q, x_s = quantize_activation_fp8_group(x)
    b = torch.randn(n, device=case.device).to(out) if bias else None
    expected = ref.fp8_block_gemm(x_q.reshape(-1, k), x_s.reshape(x_q.reshape(-1, k).shape[0], -1), qw.qweight,
                                  qw.scale, b, out)
    with case.active():
        got = omniops.fp8_block_gemm(x_q, x_s, qw.qweight, qw.scale, b, out_dtype=out)
    assert got.shape == (*x.shape[:-1], n) and got.dtype == out
    assert_close(got.reshape(-1, n), expected, scale=_scale(k))


def _deepseek_v3_layer(n: int, k: int, device: str) -> dict[str, torch.Tensor]:
    """A state dict in DeepSeek-V3's fp8 checkpoint layout, made locally from random data: ``weight``
    float8_e4m3fn [N, K], ``weight_scale_inv`` float32 [ceil(N/128), ceil(K/128)] (dequant = weight * scale)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g)
    codes[(codes & 0x7F) == 0x7F] = 0x3F  # no NaN patterns (the real checkpoints have none)
    return {
        "weight": codes.view(torch.float8_e4m3fn).to(device),
        "weight_scale_inv": (torch.rand(math.ceil(n / 128), math.ceil(k / 128), generator=g) * 1e-3).to(device),
    }


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_fp8_deepseek_v3_checkpoint_layout(case: Case) -> None:
    """Weights in the checkpoint's layout load unchanged (QuantLinear buffer names included) and multiply
    correctly against an independent dequantize-then-matmul in float64."""
    skip_unsupported(case, torch.float32)
    n, k = 300, 520
    sd = _deepseek_v3_layer(n, k, case.device)
    lin = omniops.QuantLinear(omniops.quant.Fp8BlockWeight(sd["weight"], sd["weight_scale_inv"]))
    lin.load_state_dict({"qweight": sd["weight"], "weight_scale_inv": sd["weight_scale_inv"]}, strict=False)
    x = torch.randn(5, k, device=case.device)
    x_q, x_s = quantize_activation_fp8_group(x)
    w64 = sd["weight"].double() * sd["weight_scale_inv"].double().repeat_interleave(128, 0)[:n].repeat_interleave(
        128, 1)[:, :k]
    x64 = x_q.double() * x_s.double().repeat_interleave(128, 1)[:, :k]
    expected = (x64 @ w64.t()).float()
    with case.active():
        got = omniops.fp8_block_gemm(x_q, x_s, sd["weight"], sd["weight_scale_inv"], out_dtype=torch.float32)
        got_mod = lin(x)
    assert_close(got, expected, scale=_scale(k))
    assert_close(got_mod, expected, scale=_scale(k))


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_fp8_every_code_decodes_exactly(case: Case) -> None:
    """All 254 finite e4m3 codes (normals and subnormals, both signs) through the kernel's fp8 decode: with
    one-hot activations each output is one weight value times its scale."""
    skip_unsupported(case, torch.float32)
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    k = codes.numel()
    w_q = codes.view(torch.float8_e4m3fn).reshape(1, k).to(case.device)
    x_q = torch.eye(k, device=case.device).to(torch.float8_e4m3fn)
    ones_x = torch.ones(k, math.ceil(k / 128), device=case.device)
    with case.active():
        got = omniops.fp8_block_gemm(x_q, ones_x, w_q, torch.ones(1, 2, device=case.device), out_dtype=torch.float32)
    assert torch.equal(got.reshape(-1), w_q.float().reshape(-1))


# ---- empty and bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", BACKEND_CASES)
def test_empty(case: Case) -> None:
    skip_unsupported(case, torch.float32)
    dev = case.device
    with case.active():
        y = omniops.w8a8_gemm(torch.zeros(0, 16, dtype=torch.int8, device=dev), torch.zeros(0, 1, device=dev),
                              torch.zeros(4, 16, dtype=torch.int8, device=dev), torch.ones(4, device=dev),
                              out_dtype=torch.float32)
        assert y.shape == (0, 4)
        b = torch.arange(3.0, device=dev)
        y = omniops.w8a8_gemm(torch.zeros(2, 0, dtype=torch.int8, device=dev), torch.ones(2, 1, device=dev),
                              torch.zeros(3, 0, dtype=torch.int8, device=dev), torch.ones(3, device=dev), b,
                              out_dtype=torch.float32)
        assert torch.equal(y, b.expand(2, 3))
        y = omniops.w4a16_gemm(torch.zeros(0, 64, device=dev), torch.zeros(5, 32, dtype=torch.uint8, device=dev),
                               torch.ones(5, 2, device=dev), None, 32)
        assert y.shape == (0, 5)


def _w8a8_args():
    return {"x_q": torch.zeros(2, 32, dtype=torch.int8), "x_scale": torch.ones(2, 1),
            "w_q": torch.zeros(4, 32, dtype=torch.int8), "w_scale": torch.ones(4), "bias": None,
            "out_dtype": torch.float32}


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"x_q": torch.zeros(2, 32)}, TypeError, "x_q: expected dtype"),
        ({"w_q": torch.zeros(4, 16, dtype=torch.uint8)}, TypeError, "w_q: expected dtype"),  # int4 packed as w_q
        ({"w_q": torch.zeros(4, 31, dtype=torch.int8)}, ValueError, r"w_q: expected shape \[N, 32\]"),
        ({"x_scale": torch.ones(3, 1)}, ValueError, "x_scale: expected shape"),
        ({"x_scale": torch.ones(2, 1, dtype=torch.float16)}, TypeError, "x_scale: expected dtype"),
        ({"w_scale": torch.ones(5)}, ValueError, r"w_scale: expected shape \[4\]"),
        ({"bias": torch.ones(4, dtype=torch.float16)}, TypeError, "bias: expected dtype float32"),
        ({"bias": torch.ones(5)}, ValueError, "bias: expected shape"),
        ({"out_dtype": torch.int8}, TypeError, "out_dtype"),
        ({"out_dtype": torch.int32, "bias": torch.ones(4, dtype=torch.int32)}, ValueError, "bias: not supported"),
        ({"x_q": torch.zeros(1, 131072, dtype=torch.int8)}, ValueError, "131071"),
    ],
)
def test_w8a8_bad_input(kwargs, exc, match) -> None:
    a = _w8a8_args() | kwargs
    with pytest.raises(exc, match=match):
        omniops.w8a8_gemm(a["x_q"], a["x_scale"], a["w_q"], a["w_scale"], a["bias"], out_dtype=a["out_dtype"])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"x": torch.zeros(2, 96)}, ValueError, "K=96 must be a multiple of group_size=64"),
        ({"w": torch.zeros(4, 64, dtype=torch.int8)}, TypeError, "w_packed: expected dtype"),  # int4 as int8
        ({"w": torch.zeros(4, 128, dtype=torch.uint8)}, ValueError, "two int4 values per byte"),
        ({"scales": torch.ones(4, 1)}, ValueError, "scales: expected shape"),
        ({"scales": torch.ones(4, 2, dtype=torch.float16)}, TypeError, "scales: expected dtype"),
        ({"zeros": torch.zeros(4, 2, dtype=torch.int8)}, TypeError, "zeros: expected dtype"),
        ({"zeros": torch.zeros(4, 3, dtype=torch.uint8)}, ValueError, "zeros: expected shape"),
        ({"g": 48}, ValueError, "group_size"),
        ({"x": torch.zeros(2, 128, dtype=torch.float64)}, TypeError, "x: expected dtype"),
        ({"bias": torch.ones(4, dtype=torch.bfloat16)}, TypeError, "bias: expected dtype"),
    ],
)
def test_w4a16_bad_input(kwargs, exc, match) -> None:
    a = {"x": torch.zeros(2, 128), "w": torch.zeros(4, 64, dtype=torch.uint8), "scales": torch.ones(4, 2),
         "zeros": None, "g": 64, "bias": None} | kwargs
    with pytest.raises(exc, match=match):
        omniops.w4a16_gemm(a["x"], a["w"], a["scales"], a["zeros"], a["g"], a["bias"])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"x_q": torch.zeros(2, 200, dtype=torch.int8)}, TypeError, "x_q: expected dtype"),
        ({"w_q": torch.zeros(3, 200, dtype=torch.uint8)}, TypeError, "w_q: expected dtype"),
        ({"x_scale": torch.ones(2, 1)}, ValueError, r"x_scale: expected shape \[2, 2\]"),
        ({"w_scale": torch.ones(3, 2)}, ValueError, r"w_scale: expected shape \[1, 2\]"),
        ({"w_scale": torch.ones(1, 2, dtype=torch.bfloat16)}, TypeError, "w_scale: expected dtype"),
        ({"out_dtype": torch.int32}, TypeError, "out_dtype"),
    ],
)
def test_fp8_bad_input(kwargs, exc, match) -> None:
    f8 = torch.float8_e4m3fn
    a = {"x_q": torch.zeros(2, 200).to(f8), "x_scale": torch.ones(2, 2), "w_q": torch.zeros(3, 200).to(f8),
         "w_scale": torch.ones(1, 2), "out_dtype": torch.float32} | kwargs
    with pytest.raises(exc, match=match):
        omniops.fp8_block_gemm(a["x_q"], a["x_scale"], a["w_q"], a["w_scale"], out_dtype=a["out_dtype"])


_I8, _U8, _F8 = torch.int8, torch.uint8, torch.float8_e4m3fn


@pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")
@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o, x.float(), xs, w, ws), TypeError, "x_q: expected dtype"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o, x, xs, w[:, :5], ws), ValueError, "w_q: expected shape"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o, x, xs[:1], w, ws), ValueError, "x_scale: expected shape"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o, x, xs, w, ws[:2]), ValueError, "w_scale: expected shape"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o[:1], x, xs, w, ws), ValueError, "out: expected shape"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o.t(), x, xs, w, ws), ValueError, "out"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o, x.t(), xs, w, ws), ValueError, "x_q"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o.half(), x, xs, w, ws, torch.ones(4)), TypeError, "bias"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o.int(), x, xs, w, ws, torch.ones(4)), ValueError, "bias"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o, x, xs, w, ws, torch.ones(3)), ValueError, "bias"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o.to(_I8), x, xs, w, ws), TypeError, "out"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o, x.to("meta"), xs, w, ws), ValueError, "x_q: expected a CPU"),
        (lambda C, o, x, xs, w, ws: C.w8a8_gemm(o, x[:, :0], xs, w[:, :0], ws), ValueError, "K must be > 0"),
        (lambda C, o, x, xs, w, ws: C.w4a16_gemm(o, x.float(), w.view(_U8)[:, :15].contiguous(), torch.ones(4, 1),
                                                 None, 32), ValueError, "w_packed: expected shape"),
        (lambda C, o, x, xs, w, ws: C.w4a16_gemm(o, x.float(), w.view(_U8)[:, :16], torch.ones(4, 1), None, 32),
         ValueError, "w_packed: must be contiguous"),
        (lambda C, o, x, xs, w, ws: C.w4a16_gemm(o, x.float(), w[:, :16], torch.ones(4, 1), None, 32), TypeError,
         "w_packed: expected dtype"),
        (lambda C, o, x, xs, w, ws: C.w4a16_gemm(o, x.float(), w.view(_U8)[:, :16].contiguous(), torch.ones(4, 2),
                                                 None, 32), ValueError, "scales: expected shape"),
        (lambda C, o, x, xs, w, ws: C.w4a16_gemm(o, x.float()[:, :24], w.view(_U8)[:, :12].contiguous(),
                                                 torch.ones(4, 1), None, 32), ValueError, "multiple of group_size"),
        (lambda C, o, x, xs, w, ws: C.w4a16_gemm(o, x.float(), w.view(_U8)[:, :16].contiguous(), torch.ones(4, 1),
                                                 torch.zeros(4, 2, dtype=_U8), 32), ValueError, "zeros"),
        (lambda C, o, x, xs, w, ws: C.w4a16_gemm(o, x.float(), w.view(_U8)[:, :16].contiguous(), torch.ones(4, 1),
                                                 None, 48), ValueError, "group_size"),
        (lambda C, o, x, xs, w, ws: C.fp8_block_gemm(o, x.float().to(_F8), torch.ones(3, 2), w.float().to(_F8),
                                                     torch.ones(1, 1)), ValueError, "x_scale: expected shape"),
        (lambda C, o, x, xs, w, ws: C.fp8_block_gemm(o, x.float().to(_F8), torch.ones(3, 1), w.float().to(_F8),
                                                     torch.ones(4, 1)), ValueError, "w_scale: expected shape"),
        (lambda C, o, x, xs, w, ws: C.fp8_block_gemm(o, x, torch.ones(3, 1), w.float().to(_F8), torch.ones(1, 1)),
         TypeError, "x_q: expected dtype"),
        (lambda C, o, x, xs, w, ws: C.fp8_block_gemm(o.int(), x.float().to(_F8), torch.ones(3, 1),
                                                     w.float().to(_F8), torch.ones(1, 1)), TypeError, "out"),
    ],
)
def test_cpp_entry_point_rejects_bad_input(call, exc, match) -> None:
    """omniops._C is reachable directly: it must check everything itself and never touch memory it was not given."""
    x, w = torch.zeros(3, 32, dtype=_I8), torch.zeros(4, 32, dtype=_I8)
    with pytest.raises(exc, match=match):
        call(_ext.cpp(), torch.empty(3, 4), x, torch.ones(3), w, torch.ones(4))


# ---- opcheck, torch.compile -------------------------------------------------------------------------------
def test_opcheck() -> None:
    x = torch.randn(3, 256)
    ops = torch.ops.omni
    q8 = quantize_weight(torch.randn(5, 256), "int8_channel")
    x_q, x_s = quantize_activation_per_token_int8(x)
    torch.library.opcheck(ops.w8a8_gemm.default, (x_q, x_s, q8.qweight, q8.scale, torch.randn(5), torch.float32))
    torch.library.opcheck(ops.w8a8_gemm.default, (x_q, x_s, q8.qweight, q8.scale, None, torch.int32))
    q4 = quantize_weight(torch.randn(5, 256), "int4_group", group_size=64, symmetric=False)
    torch.library.opcheck(ops.w4a16_gemm.default, (x, q4.packed, q4.scales, q4.zeros, 64, None))
    qf = quantize_weight(torch.randn(5, 256), "fp8_block")
    xf, xfs = quantize_activation_fp8_group(x)
    # test_schema compares inputs before/after with ops torch lacks for float8 on CPU ("mul_cpu_reduced_float"
    # not implemented for Float8_e4m3fn): the other three opcheck tests still run on the fp8 op.
    torch.library.opcheck(ops.fp8_block_gemm.default, (xf, xfs, qf.qweight, qf.scale, None, torch.bfloat16),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.compile
def test_torch_compile() -> None:
    q8 = quantize_weight(torch.randn(6, 64), "int8_channel")
    q4 = quantize_weight(torch.randn(6, 64), "int4_group", group_size=32)

    def f(x: torch.Tensor) -> torch.Tensor:
        x_q, x_s = quantize_activation_per_token_int8(x)
        y = omniops.w8a8_gemm(x_q, x_s, q8.qweight, q8.scale, out_dtype=torch.float32)
        return y + omniops.w4a16_gemm(x, q4.packed, q4.scales, None, 32)

    x = torch.randn(3, 64)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
