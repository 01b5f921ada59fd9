"""silu_and_mul: every backend vs the reference, layouts, out=, errors, opcheck."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omniops
from omniops import _ext
from omniops.reference.activation import silu_and_mul as ref_silu_and_mul
from omniops.testing import assert_close
from tests.ops._cases import BACKEND_CASES, DTYPES, LAYOUTS, Case, skip_unsupported, strided

D = st.sampled_from([1, 3, 64, 123, 989, 7168, 40000])  # 40000 fp32 > one UB chunk of the CPU kernel
LEAD = st.lists(st.integers(0, 4), min_size=0, max_size=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@given(lead=LEAD, d=D, layout=st.sampled_from(LAYOUTS), use_out=st.booleans(), scale=st.sampled_from([1.0, 30.0]))
def test_matches_reference(case: Case, dtype: torch.dtype, lead, d, layout, use_out, scale) -> None:
    skip_unsupported(case, dtype)
    x = (scale * torch.randn(*lead, 2 * d, device=case.device)).to(dtype)  # scale 30: exp saturates both ways
    expected = ref_silu_and_mul(x)
    with case.active():
        if use_out:
            out = strided(torch.empty_like(expected), layout)
            got = omniops.silu_and_mul(strided(x, layout), out=out)
            assert got is out
        else:
            got = omniops.silu_and_mul(strided(x, layout))
    assert got.shape == expected.shape and got.dtype == dtype
    assert_close(got, expected)


def test_opcheck() -> None:
    x = torch.randn(3, 2, 18)
    torch.library.opcheck(torch.ops.omni.silu_and_mul.default, (x,))
    torch.library.opcheck(torch.ops.omni.silu_and_mul_out.default, (torch.empty(3, 2, 9), x))


@pytest.mark.parametrize(
    ("x", "out", "exc", "match"),
    [
        (torch.randn(2, 7), None, ValueError, "x: the last dimension must be even"),
        (torch.randn(2, 8, dtype=torch.float64), None, TypeError, "x: expected dtype"),
        (torch.randn(()), None, ValueError, "x: expected at least 1"),
        (torch.randn(2, 8), torch.empty(2, 8), ValueError, r"out: expected shape \[2, 4\]"),
        (torch.randn(2, 8), torch.empty(2, 4, dtype=torch.float16), TypeError, "out: expected dtype float32"),
    ],
)
def test_bad_input(x, out, exc, match) -> None:
    with pytest.raises(exc, match=match):
        omniops.silu_and_mul(x, out=out)


@pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")
@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda C, x: C.silu_and_mul(torch.empty(4, 8), x[:, :15]), ValueError, "must be even"),
        (lambda C, x: C.silu_and_mul(torch.empty(3, 8), x), ValueError, r"out: expected shape \[4, 8\]"),
        (lambda C, x: C.silu_and_mul(torch.empty(4, 8, dtype=torch.half), x), TypeError, "out: expected dtype"),
        (lambda C, x: C.silu_and_mul(x[:, :8], x), ValueError, "overlap|alias"),
        (lambda C, x: C.silu_and_mul(torch.empty(8, 4).t(), x), ValueError, "contiguous"),
        (lambda C, x: C.silu_and_mul(torch.empty(4, 8), x.int()), TypeError, "x: expected float32"),
    ],
)
def test_cpp_entry_point_rejects_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call(_ext.cpp(), torch.randn(4, 16))
