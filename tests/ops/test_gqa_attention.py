"""gqa_attention: attention over contiguous K/V in SDPA layout (HF's DynamicCache), every backend vs the oracle,
vs torch SDPA, edge cases (no keys, one key, fully masked rows, odd head groups, strided inputs), bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import omniops
from omniops import _ext
from omniops._backends import BackendError
from omniops.reference import attention as ref
from omniops.testing import assert_close
from tests.ops._cases import BACKEND_CASES, DTYPES, Case, skip_unsupported


def _inputs(B, hq, hk, S, L, D, Dv, dtype, device="cpu", hf_layout=True):
    # HF's q/k/v are views [B, H, S, D] of token-major [B, S, H, D] projections
    q = torch.randn(B, S, hq, D, device=device).to(dtype).transpose(1, 2) if hf_layout else \
        torch.randn(B, hq, S, D, device=device).to(dtype)
    k = torch.randn(B, hk, L, D, device=device).to(dtype)
    v = torch.randn(B, L, hk, Dv, device=device).to(dtype).transpose(1, 2)
    return q, k, v


def _mask(kind, B, hq, S, L, dtype, device="cpu"):
    if kind == "none":
        return None
    if kind == "bool":  # per batch, shared by heads; some rows fully masked
        return torch.rand(B, 1, S, L, device=device) > 0.4
    return torch.randn(1, hq, S, L, device=device).to(dtype)  # additive, per head, broadcast over the batch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@settings(max_examples=10)
@given(B=st.integers(1, 3), hk=st.sampled_from([1, 2, 3]), g=st.sampled_from([1, 2, 5]), L=st.integers(0, 70),
       s_frac=st.floats(0, 1), dims=st.sampled_from([(8, 8), (24, 16), (64, 64)]), causal=st.booleans(),
       mask=st.sampled_from(["none", "bool", "float"]), hf_layout=st.booleans())
def test_matches_reference(case: Case, dtype, B, hk, g, L, s_frac, dims, causal, mask, hf_layout) -> None:
    skip_unsupported(case, dtype, uses_dot=True)
    if case.backend == "triton":
        mask = "none"  # the triton kernels take no mask (test_triton_rejects_mask)
        L = min(L, 40)
    S = 1 if L and s_frac < 0.3 else round(s_frac * L)
    D, Dv = dims
    q, k, v = _inputs(B, hk * g, hk, S, L, D, Dv, dtype, case.device, hf_layout)
    m = _mask(mask, B, hk * g, S, L, dtype, case.device)
    expected = ref.gqa_attention(q, k, v, m, causal, 1 / math.sqrt(D))
    with case.active():
        got = omniops.gqa_attention(q, k, v, m, causal=causal)
    assert got.shape == (B, hk * g, S, Dv) and got.dtype == dtype
    assert got.transpose(1, 2).is_contiguous()  # laid out [B, S, H, Dv]
    assert not got.isnan().any()
    assert_close(got, expected, scale=4 if dtype != torch.float32 else 1)


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("S", [1, 17])
def test_equals_sdpa(case: Case, S: int) -> None:
    """With S == L causal (prefill) and S == 1 (decode), GQA via enable_gqa, and a bool / additive mask."""
    B, hq, hk, D = 2, 6, 2, 32
    L = S if S > 1 else 29
    q, k, v = _inputs(B, hq, hk, S, L, D, D, torch.float32, case.device)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, enable_gqa=True)
    with case.active():
        assert_close(omniops.gqa_attention(q, k, v, causal=S > 1), expected)
    if case.backend == "triton":
        return
    bool_mask = torch.rand(B, 1, S, L) > 0.3
    bool_mask[..., 0] = True  # SDPA gives NaN for rows that see nothing
    add_mask = torch.randn(S, L)
    for m in (bool_mask, add_mask):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True, scale=0.3)
        with case.active():
            assert_close(omniops.gqa_attention(q, k, v, m, scale=0.3), expected)


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_edge_cases(case: Case) -> None:
    with case.active():
        # no keys, no queries: empty / zero outputs of the right shape
        q, k, v = _inputs(2, 4, 2, 0, 0, 8, 8, torch.float32, case.device)
        assert omniops.gqa_attention(q, k, v).shape == (2, 4, 0, 8)
        q, k, v = _inputs(2, 4, 2, 0, 5, 8, 8, torch.float32, case.device)
        assert omniops.gqa_attention(q, k, v).shape == (2, 4, 0, 8)
        # one key
        q, k, v = _inputs(1, 3, 1, 1, 1, 8, 8, torch.float32, case.device)
        assert_close(omniops.gqa_attention(q, k, v), v.expand(1, 3, 1, 8))
        # causal with S == L: the first query sees only the first key
        q, k, v = _inputs(1, 2, 2, 4, 4, 8, 8, torch.float32, case.device)
        assert_close(omniops.gqa_attention(q, k, v, causal=True)[:, :, 0], v[:, :, 0])
    if case.backend != "triton":
        q, k, v = _inputs(1, 2, 1, 3, 5, 8, 8, torch.float32, case.device)
        m = torch.ones(1, 1, 3, 5, dtype=torch.bool)
        m[0, 0, 1] = False  # a fully masked row gives zeros (SDPA: NaN)
        with case.active():
            out = omniops.gqa_attention(q, k, v, m)
        assert (out[:, :, 1] == 0).all() and not out.isnan().any()


def test_triton_rejects_mask() -> None:
    q, k, v = _inputs(1, 2, 1, 2, 3, 8, 8, torch.float32)
    with omniops.use_backend("triton"), pytest.raises(BackendError, match="attn_mask"):
        omniops.gqa_attention(q, k, v, torch.ones(2, 3, dtype=torch.bool))


def test_opcheck() -> None:
    q, k, v = _inputs(2, 4, 2, 3, 7, 16, 8, torch.float32)
    op = torch.ops.omni.gqa_attention.default
    torch.library.opcheck(op, (q, k, v, None, True, 0.25))
    torch.library.opcheck(op, (q, k, v, torch.randn(1, 1, 3, 7), False, 0.25))
    torch.library.opcheck(op, (q[:, :, :1], k, v, torch.rand(2, 4, 1, 7) > 0.5, False, 0.25))


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(q=torch.randn(2, 4, 9, 16)), ValueError, "exceeds the key length"),
        (dict(q=torch.randn(2, 3, 2, 16)), ValueError, "multiple of kv_heads"),
        (dict(q=torch.randn(2, 4, 2, 8)), ValueError, "k: expected shape"),
        (dict(v=torch.randn(2, 2, 6, 16)), ValueError, "v: expected shape"),
        (dict(k=torch.randn(2, 2, 7, 16).half()), (TypeError, ValueError), "dtype"),
        (dict(q=torch.randn(2, 4, 2, 16).long()), TypeError, "q"),
        (dict(attn_mask=torch.ones(2, 4, 2, 5, dtype=torch.bool)), ValueError, "attn_mask: dim 3"),
        (dict(attn_mask=torch.ones(3, 1, 2, 7, dtype=torch.bool)), ValueError, "attn_mask: dim 0"),
        (dict(attn_mask=torch.ones(2, 7, dtype=torch.int32)), TypeError, "attn_mask: expected bool"),
        (dict(attn_mask=torch.ones(2, 7, device="meta")), ValueError, "attn_mask: expected device"),
    ],
)
def test_bad_input(kw, exc, match) -> None:
    args = dict(q=torch.randn(2, 4, 2, 16), k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16))
    args.update(kw)
    with pytest.raises(exc, match=match):
        omniops.gqa_attention(**args)


@pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")
@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.update(attn_mask=torch.ones(2, 4, 2, 6, dtype=torch.bool)), "attn_mask: expected shape"),
        (lambda a: a.update(attn_mask=torch.ones(2, 4, 2, 7, dtype=torch.float16)), "attn_mask: expected bool"),
        (lambda a: a.update(out=torch.empty(2, 4, 2, 15)), "out: expected shape"),
        (lambda a: a.update(q=torch.randn(2, 4, 8, 16)), "exceeds the key length"),
        (lambda a: a.update(k=torch.randn(2, 3, 7, 16), v=torch.randn(2, 3, 7, 16)), "multiple of kv_heads"),
        (lambda a: a.update(q=torch.randn(2, 4, 2, 300), k=torch.randn(2, 2, 7, 300)), "head dims"),
        (lambda a: a.update(out=a["k"].view(-1)[8:264].view(2, 4, 2, 16)), "out partially overlaps k"),
    ],
)
def test_cpp_entry_point_rejects_bad_input(mutate, match) -> None:
    args = dict(out=torch.empty(2, 4, 2, 16), q=torch.randn(2, 4, 2, 16), k=torch.randn(2, 2, 7, 16),
                v=torch.randn(2, 2, 7, 16), attn_mask=None, causal=True, scale=0.25)
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        _ext.cpp().dense_attention(**args)
