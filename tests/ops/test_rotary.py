"""rotary_embedding: neox / gpt-j, partial rotary, q and k head counts differ, layouts, in place, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omniops
from omniops import _ext
from omniops.reference.rotary import rotary_embedding as ref_rotary
from omniops.testing import assert_close
from tests.ops._cases import BACKEND_CASES, DTYPES, Case, skip_unsupported

# (head_size, rotary_dim): full rotary, DeepSeek-style 64 of 192 (q_pe inside qk_head_dim), odd partial, tiny
HEAD = st.sampled_from([(64, 64), (128, 128), (192, 64), (80, 40), (6, 2), (576, 64)])


def _cache(max_pos: int, rotary_dim: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@given(tokens=st.integers(0, 9), q_heads=st.integers(1, 6), k_heads=st.integers(0, 3), head=HEAD,
       is_neox=st.booleans(), flat=st.booleans(), cache_fp32=st.booleans(), inplace=st.booleans(),
       sliced=st.booleans(), pos_i32=st.booleans())
def test_matches_reference(case: Case, dtype, tokens, q_heads, k_heads, head, is_neox, flat, cache_fp32,
                           inplace, sliced, pos_i32) -> None:
    skip_unsupported(case, dtype)
    head_size, rotary_dim = head
    dev = case.device
    cache = _cache(100, rotary_dim, torch.float32 if cache_fp32 else dtype, dev)
    positions = torch.randint(0, 100, (tokens,), device=dev, dtype=torch.int32 if pos_i32 else torch.int64)
    # q, k as slices of one fused qkv buffer (vLLM's layout: row-strided, not contiguous) or standalone
    if sliced:
        qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * head_size, device=dev).to(dtype)
        q = qkv[:, : q_heads * head_size]
        k = qkv[:, q_heads * head_size: (q_heads + k_heads) * head_size]
    else:
        q = torch.randn(tokens, q_heads * head_size, device=dev).to(dtype)
        k = torch.randn(tokens, k_heads * head_size, device=dev).to(dtype)
    if not flat:
        q, k = q.unflatten(-1, (q_heads, head_size)), k.unflatten(-1, (k_heads, head_size))
    k_arg = k if k_heads else None
    qr, kr = ref_rotary(positions, q, k_arg, cache, head_size, rotary_dim, is_neox)
    with case.active():
        if inplace:
            qo, ko = q.clone(), (k.clone() if k_arg is not None else None)
            omniops.rotary_embedding_(positions, qo, ko, cache, head_size, rotary_dim, is_neox)
        else:
            qo, ko = omniops.rotary_embedding(positions, q, k_arg, cache, head_size, rotary_dim, is_neox)
    assert qo.shape == q.shape and qo.dtype == dtype
    assert_close(qo, qr)
    if k_arg is None:
        assert ko is None
    else:
        assert_close(ko, kr)


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_batched_positions_and_transposed_input(case: Case) -> None:
    """positions [B, S] with q [B, S, H, D]; a q whose heads cannot be viewed is handled via a copy."""
    dev = case.device
    cache = _cache(64, 32, torch.float32, dev)
    positions = torch.randint(0, 64, (2, 5), device=dev)
    q = torch.randn(2, 5, 4, 32, device=dev)
    kt = torch.randn(2, 5, 32, 2, device=dev).transpose(-1, -2)  # [2, 5, 2, 32] with non-unit inner stride
    qr, kr = ref_rotary(positions, q, kt, cache, 32, 32, True)
    with case.active():
        qo, ko = omniops.rotary_embedding(positions, q, kt, cache, 32)
        q2, k2 = q.clone(), kt.clone().transpose(-1, -2).contiguous().transpose(-1, -2)
        omniops.rotary_embedding_(positions, q2, k2, cache, 32)
    assert_close(qo, qr)
    assert_close(ko, kr)
    assert_close(q2, qr)
    assert_close(k2, kr)


def test_opcheck() -> None:
    cache = _cache(16, 8, torch.float32, "cpu")
    pos = torch.randint(0, 16, (3,))
    q, k = torch.randn(3, 2 * 16), torch.randn(3, 16)
    torch.library.opcheck(torch.ops.omni.rotary_embedding.default, (pos, q, k, cache, 16, 8, True))
    torch.library.opcheck(torch.ops.omni.rotary_embedding.default, (pos, q, None, cache, 16, 8, False))
    torch.library.opcheck(torch.ops.omni.rotary_embedding_.default, (pos, q.clone(), k.clone(), cache, 16, 8, True))


def _args(**kw):
    base = {"positions": torch.tensor([0, 3]), "q": torch.randn(2, 2 * 8), "k": torch.randn(2, 8),
            "cos_sin_cache": _cache(4, 8, torch.float32, "cpu"), "head_size": 8, "rotary_dim": 8}
    return base | kw


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"positions": torch.tensor([0, 4])}, ValueError, r"positions: entry 1 = 4 is outside \[0, 4\)"),
        ({"positions": torch.tensor([-1, 0])}, ValueError, "positions: entry 0 = -1 is outside"),
        ({"positions": torch.tensor([0.0, 1.0])}, TypeError, "positions: expected dtype"),
        ({"positions": torch.tensor([0, 1, 2])}, ValueError, "q: leading dims"),
        ({"q": torch.randn(2, 15)}, ValueError, "q: last dimension 15 is not a multiple of head_size=8"),
        ({"q": torch.randn(2, 16, dtype=torch.float64)}, TypeError, "q: expected dtype"),
        ({"k": torch.randn(2, 8, dtype=torch.float16)}, TypeError, "k: expected dtype float32"),
        ({"rotary_dim": 7}, ValueError, "rotary_dim: expected an even int"),
        ({"rotary_dim": 10}, ValueError, "rotary_dim"),
        ({"cos_sin_cache": torch.randn(4, 6)}, ValueError, r"cos_sin_cache: expected \[max_position, rotary_dim=8\]"),
        ({"head_size": 0}, ValueError, "head_size"),
    ],
)
def test_bad_input(kw, exc, match) -> None:
    a = _args(**kw)
    with pytest.raises(exc, match=match):
        omniops.rotary_embedding(a["positions"], a["q"], a["k"], a["cos_sin_cache"], a["head_size"], a["rotary_dim"])


@pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")
@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        ({"positions": torch.tensor([0, 9])}, ValueError, "positions: entry 1 = 9 is outside"),
        ({"positions": torch.tensor([0, 1], dtype=torch.int32)}, TypeError, "positions: expected dtype int64"),
        ({"q_out": torch.empty(2, 3, 8)}, ValueError, "q_out: expected shape"),
        ({"rotary_dim": 9}, ValueError, "rotary_dim"),
        ({"cache": torch.randn(8, 4)}, ValueError, "cos_sin_cache"),
        ({"k": torch.randn(2, 1, 6)}, ValueError, "k: expected"),
        ({"q_out": torch.empty(2, 8, 2).transpose(1, 2)}, ValueError, "stride 1"),
        ({"q_out": torch.empty(2, 1, 8).expand(2, 2, 8)}, ValueError, "overlap"),
    ],
)
def test_cpp_entry_point_rejects_bad_input(mutate, exc, match) -> None:
    a = {"positions": torch.tensor([0, 1]), "q": torch.randn(2, 2, 8), "k": torch.randn(2, 1, 8),
         "cache": _cache(4, 8, torch.float32, "cpu"), "rotary_dim": 8, "q_out": torch.empty(2, 2, 8),
         "k_out": torch.empty(2, 1, 8)} | mutate
    with pytest.raises(exc, match=match):
        _ext.cpp().rotary_embedding(a["positions"], a["q"], a["k"], a["cache"], a["rotary_dim"], True,
                                    a["q_out"], a["k_out"])


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_expanded_positions(case: Case) -> None:
    """positions shared by a batch, ``arange(S).expand(B, S)`` (the graph pass's form when HF's cos is
    [1, S, D]); with S = 1 its flattened view has stride 0, which the kernels must not see."""
    dev = case.device
    cache = _cache(16, 16, torch.float32, dev)
    for s in (1, 3):
        positions = torch.arange(s, device=dev).expand(4, s)
        q = torch.randn(4, s, 2, 16, device=dev)
        k = torch.randn(4, s, 1, 16, device=dev)
        qr, kr = ref_rotary(positions, q, k, cache, 16, 16, True)
        with case.active():
            qo, ko = omniops.rotary_embedding(positions, q, k, cache, 16)
        assert_close(qo, qr)
        assert_close(ko, kr)
