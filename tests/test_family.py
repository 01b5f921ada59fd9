"""Op families: every implementation matches its reference's signature; None stays None up to the C ABI."""

from __future__ import annotations

import pytest
import torch

import omniops
from omniops import _backends, _ext
from omniops._family import FAMILIES, OpFamily, pybind_params

needs_cpp = pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")


def test_every_public_op_has_a_family() -> None:
    ops = {"silu_and_mul", "rms_norm", "rotary_embedding", "gqa_decode", "mla_decode", "gqa_prefill",
           "gqa_attention", "reshape_and_cache", "mla_cache", "moe_route", "moe_dispatch", "grouped_gemm",
           "moe_combine", "fused_moe", "w8a8_gemm", "w4a16_gemm", "fp8_block_gemm", "w8a8_linear", "fp8_block_linear"}
    assert ops <= set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_implementations_match_the_reference(name: str) -> None:
    family = FAMILIES[name]
    family.check()  # raises TypeError on a mismatch
    if _ext.cpp() is not None:
        assert "cpu" in family.impls
    if _backends.triton_import_error() is None:
        assert "triton" in family.impls, f"{family.triton_module} registers no triton implementation"


def _ref(out: torch.Tensor, x: torch.Tensor, eps: float | None) -> None:
    out.copy_(x)


def test_mismatched_implementation_is_refused() -> None:
    fam = OpFamily("test_mismatch", _ref)
    try:
        with pytest.raises(TypeError, match=r"triton implementation takes \(out, y, eps\).*\(out, x, eps\)"):
            fam.impl("triton")(lambda out, y, eps: None)
        fam.impl("triton")(lambda out, x, eps, extra=1: None)  # extra trailing parameters with defaults are fine
        with pytest.raises(TypeError, match="omniops._C has no entry point"):
            fam._checked_entry(object())
    finally:
        FAMILIES.pop("test_mismatch")


def test_pybind_signature_parsing() -> None:
    class Entry:
        __doc__ = ("f(out: torch.Tensor, x: torch.Tensor | None = None, s: str = 'a, b', n: typing.SupportsInt | "
                   "typing.SupportsIndex = 0) -> None\n\ndoc")

    assert pybind_params(Entry) == [("out", None), ("x", "None"), ("s", "'a, b'"), ("n", "0")]


@needs_cpp
def test_none_becomes_the_entry_points_default() -> None:
    """soft_cap / window None reach the reference as None and the C++ entry point as its own 0 (= off)."""
    fam = FAMILIES["gqa_decode"]
    cpu = fam.cpu_impl()
    kc = torch.randn(2, 16, 2, 16)
    q, table, lens = torch.randn(1, 4, 16), torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([20],
                                                                                                   dtype=torch.int32)
    out_none, out_zero = torch.empty(1, 4, 16), torch.empty(1, 4, 16)
    cpu(out_none, q, kc, kc, table, lens, 0.25, None, None)
    _ext.cpp().gqa_decode(out_zero, q, kc, kc, table, lens, 0.25, 0.0, 0)
    assert torch.equal(out_none, out_zero)
    with omniops.use_backend("reference"):
        ref = omniops.gqa_decode(q, kc, kc, table, lens, 0.25)
    torch.testing.assert_close(out_none, ref)
