"""rms_norm / fused add + rms_norm: every backend vs the reference, layouts, in-place forms, errors, opcheck."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omniops
from omniops import _ext
from omniops.reference.norm import rms_norm as ref_rms_norm
from omniops.testing import assert_close
from tests.ops._cases import BACKEND_CASES, DTYPES, LAYOUTS, Case, skip_unsupported, strided

# hidden sizes: 1, odd, not a multiple of any tile, one UB chunk exactly, and longer than the CPU kernel's
# UB-resident chunk (13000 fp32 > 9 * 1024) so the two-pass path runs.
HIDDEN = st.sampled_from([1, 3, 64, 123, 989, 4096, 7168, 13000])
LEAD = st.lists(st.integers(0, 5), min_size=0, max_size=2)


def _inputs(lead: list[int], hidden: int, dtype: torch.dtype, device: str, residual: bool):
    x = torch.randn(*lead, hidden, dtype=dtype, device=device)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    r = torch.randn(*lead, hidden, dtype=dtype, device=device) if residual else None
    return x, w, r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@given(lead=LEAD, hidden=HIDDEN, residual=st.booleans(), layout=st.sampled_from(LAYOUTS),
       eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_matches_reference(case: Case, dtype: torch.dtype, lead, hidden, residual, layout, eps) -> None:
    skip_unsupported(case, dtype)
    x, w, r = _inputs(lead, hidden, dtype, case.device, residual)
    expected = ref_rms_norm(x, w, eps, r)
    with case.active():
        got = omniops.rms_norm(strided(x, layout), w, eps, None if r is None else strided(r, layout))
    if r is None:
        assert got.shape == x.shape and got.dtype == dtype
        assert_close(got, expected)
    else:
        assert_close(got[0], expected[0])
        assert_close(got[1], expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@given(lead=LEAD, hidden=HIDDEN, residual=st.booleans(), layout=st.sampled_from(LAYOUTS))
def test_inplace_and_out(case: Case, dtype: torch.dtype, lead, hidden, residual, layout) -> None:
    skip_unsupported(case, dtype)
    x, w, r = _inputs(lead, hidden, dtype, case.device, residual)
    expected = ref_rms_norm(x, w, 1e-6, r)
    xi, ri = strided(x.clone(), layout), (strided(r.clone(), layout) if r is not None else None)
    with case.active():
        ret = omniops.rms_norm_(xi, w, 1e-6, ri)
        assert ret is xi
        if r is None:
            out = strided(torch.empty_like(x), layout)
            omniops.rms_norm(x, w, 1e-6, out=out)
            assert_close(out, expected)
    if r is None:
        assert_close(xi, expected)
    else:
        assert_close(xi, expected[0])
        assert_close(ri, expected[1])


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_large_values_no_overflow(case: Case) -> None:
    """fp16 inputs whose squares overflow fp16 must still normalise (fp32 accumulation)."""
    skip_unsupported(case, torch.float16)
    x = torch.full((2, 256), 3000.0, dtype=torch.float16, device=case.device)
    w = torch.ones(256, dtype=torch.float16, device=case.device)
    with case.active():
        y = omniops.rms_norm(x, w, 1e-6)
    assert_close(y, torch.ones_like(y))


def test_opcheck() -> None:
    x, w, r = _inputs([3, 2], 77, torch.float32, "cpu", True)
    ops = torch.ops.omni
    torch.library.opcheck(ops.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(ops.fused_add_rms_norm.default, (x, r, w, 1e-6))
    torch.library.opcheck(ops.rms_norm_out.default, (torch.empty_like(x), x, w, 1e-6))
    torch.library.opcheck(ops.rms_norm_.default, (x.clone(), w, 1e-6))
    torch.library.opcheck(ops.fused_add_rms_norm_.default, (x.clone(), r.clone(), w, 1e-6))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"x": torch.randn(2, 8, dtype=torch.float64)}, TypeError, "x: expected dtype"),
        ({"x": torch.randint(0, 3, (2, 8))}, TypeError, "x: expected dtype"),
        ({"weight": torch.randn(7)}, ValueError, r"weight: expected shape \[8\]"),
        ({"weight": torch.randn(2, 8)}, ValueError, "weight: expected a 1-D"),
        ({"weight": torch.randn(8, dtype=torch.float16)}, TypeError, "weight: expected dtype float32"),
        ({"residual": torch.randn(3, 8)}, ValueError, "residual: expected shape"),
        ({"residual": torch.randn(2, 8, dtype=torch.bfloat16)}, TypeError, "residual: expected dtype"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"eps": float("nan")}, ValueError, "eps"),
        ({"x": torch.randn(())}, ValueError, "x: expected at least 1"),
        ({"x": "not a tensor"}, TypeError, "x: expected a torch.Tensor"),
    ],
)
def test_bad_input(kwargs, exc, match) -> None:
    args = {"x": torch.randn(2, 8), "weight": torch.randn(8), "eps": 1e-6, "residual": None} | kwargs
    with pytest.raises(exc, match=match):
        omniops.rms_norm(args["x"], args["weight"], args["eps"], args["residual"])


@pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")
@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda C, x, w, o: C.rms_norm(o, x.double(), w, 1e-6), TypeError, "x: expected float32"),
        (lambda C, x, w, o: C.rms_norm(o, x, w[:5], 1e-6), ValueError, "weight: expected shape"),
        (lambda C, x, w, o: C.rms_norm(o[:1], x, w, 1e-6), ValueError, "out: expected shape"),
        (lambda C, x, w, o: C.rms_norm(o, x.t(), w, 1e-6), ValueError, "x: expected shape|contiguous"),
        (lambda C, x, w, o: C.rms_norm(o, x.reshape(-1), w, 1e-6), ValueError, "x: expected a 2-D"),
        (lambda C, x, w, o: C.rms_norm(o, x, w, -1.0), ValueError, "eps"),
        (lambda C, x, w, o: C.rms_norm(x[:, 1:9], x[:, :8], w[:8], 1e-6), ValueError, "partially overlaps"),
        (lambda C, x, w, o: C.rms_norm(o, x, w, 1e-6, x), ValueError, "go together"),
        (lambda C, x, w, o: C.rms_norm(o, x, w, 1e-6, x[:1], o), ValueError, "residual: expected shape"),
        (lambda C, x, w, o: C.rms_norm(torch.empty(4, 16)[:, ::2].expand(4, 8), x, w, 1e-6), ValueError, "out"),
        (lambda C, x, w, o: C.rms_norm(o, x.to("meta"), w, 1e-6), ValueError, "x: expected a CPU tensor"),
    ],
)
def test_cpp_entry_point_rejects_bad_input(call, exc, match) -> None:
    """omniops._C is reachable directly: it must check everything itself and never touch memory it was not given."""
    x, w = torch.randn(4, 16), torch.randn(16)
    with pytest.raises(exc, match=match):
        call(_ext.cpp(), x, w, torch.empty(4, 16))
