"""The linear pass: decode-sized F.linear (with and without bias) -> omni::grouped_gemm over one group; an fp32
linear with more rows than linear_max_rows (prefill-sized, compute-bound) stays torch's mm — in bf16 too when the
CPU has native bf16 matmul units (else torch's bf16 GEMM is the slow one and every size is rewritten)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniops.testing import assert_close
from tests.graph_passes._util import compile_omni, omni_ops

pytestmark = pytest.mark.compile


def linears(x, big, w, b, w2):
    return F.linear(x, w), F.linear(x, w2, b), F.linear(big, w)  # the last: 40 rows > linear_max_rows=16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_pass(dtype):
    g = torch.Generator().manual_seed(0)
    x, big = torch.randn(4, 96, generator=g).to(dtype), torch.randn(40, 96, generator=g).to(dtype)
    w, w2 = torch.randn(80, 96, generator=g).to(dtype), torch.randn(48, 96, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    args = (x, big, w, b, w2)
    _, out, rep = compile_omni(linears, *args)
    for o, r in zip(out, linears(*args), strict=True):
        assert_close(o, r)
    from omniops.graph_passes.linear import _native_half_matmul

    want = 3 if dtype != torch.float32 and not _native_half_matmul() else 2
    assert rep.matched["linear"] == want, rep.format()
    assert omni_ops(rep)["grouped_gemm"] == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_pass_measured_choice_follows_the_calibration(dtype):
    """linear_measure: each linear is rewritten exactly where the calibration on this CPU says omni wins."""
    from omniops import _calibrate, _ext

    if _ext.cpp() is None:
        pytest.skip("omniops._C is not built")
    g = torch.Generator().manual_seed(0)
    x, big = torch.randn(4, 96, generator=g).to(dtype), torch.randn(40, 96, generator=g).to(dtype)
    w, w2 = torch.randn(80, 96, generator=g).to(dtype), torch.randn(48, 96, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    args = (x, big, w, b, w2)
    _, out, rep = compile_omni(linears, *args, options={"linear_measure": True})
    for o, r in zip(out, linears(*args), strict=True):
        assert_close(o, r)
    small = bool(_calibrate.omni_linear_wins(dtype, 4))
    large = bool(_calibrate.omni_linear_wins(dtype, 40)) and bool(_calibrate.omni_linear_wins(dtype, 1 << 30))
    assert rep.matched.get("linear", 0) == 2 * small + large, (rep.format(), _calibrate.linear_table(dtype))
