"""Valid inputs, generated: the cpu kernels on every ISA library this CPU can run against the reference.

The layouts are the ones the hardening must keep accepting (interleaved views that share one tensor without
overlapping: q / k column slices of a qkv matrix rotated in place, k / v halves of one cache written by
reshape_and_cache and read by the decode; SDPA-transposed q / k / v), plus the scheduling moved into the kernels
(split-KV decode planning, the dense-attention launches) and the fp8 activation quantization, which must give the
two-step path's codes bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniops
from omniops import _cpu, _ext
from omniops.quant.formats import quantize_activation_fp8_group, quantize_weight
from omniops.testing import assert_close

ISAS = _cpu.available_isas() if _ext.cpp() is not None else []
pytestmark = [pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built"),
              pytest.mark.parametrize("isa", ISAS)]
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
I32 = torch.int32
EXAMPLES = settings(max_examples=8)


def _both(isa: str, fn):
    """(cpu on isa, reference) results of fn()."""
    with _cpu.force_isa(isa), omniops.use_backend("cpu"):
        got = fn()
    with omniops.use_backend("reference"):
        want = fn()
    return got, want


def _paged(nb: int, bs: int, h: int, d: int, dtype, shared: bool):
    """k / v caches; shared: the two halves of one [nb, bs, 2, h, d] tensor (interleaved, disjoint)."""
    if shared:
        kv = torch.randn(nb, bs, 2, h, d).to(dtype)
        return kv[:, :, 0], kv[:, :, 1]
    return torch.randn(nb, bs, h, d).to(dtype), torch.randn(nb, bs, h, d).to(dtype)


def _table(lens: list[int], bs: int, nb: int) -> torch.Tensor:
    per = max(1, max((n + bs - 1) // bs for n in lens))
    perm = torch.randperm(nb)
    return torch.stack([perm[(b * per + torch.arange(per)) % nb] for b in range(len(lens))]).to(I32)


@given(B=st.integers(1, 3), hkv=st.integers(1, 2), g=st.sampled_from([1, 3]), d=st.sampled_from([8, 24]),
       bs=st.sampled_from([1, 4, 16]), lens=st.lists(st.integers(0, 70), min_size=3, max_size=3), dtype=DTYPES,
       cap=st.sampled_from([0.0, 5.0]), window=st.sampled_from([0, 7]), shared=st.booleans())
@EXAMPLES
def test_gqa_decode(isa, B, hkv, g, d, bs, lens, dtype, cap, window, shared) -> None:
    lens = lens[:B]
    nb = 3 * max(1, sum((n + bs - 1) // bs for n in lens))
    kc, vc = _paged(nb, bs, hkv, d, dtype, shared)
    q, table, sl = torch.randn(B, hkv * g, d).to(dtype), _table(lens, bs, nb), torch.tensor(lens, dtype=I32)
    got, want = _both(isa, lambda: omniops.gqa_decode(q, kc, vc, table, sl, soft_cap=cap or None,
                                                      window=window or None))
    assert_close(got, want, scale=2.0)


@given(B=st.integers(1, 3), h=st.sampled_from([1, 4]), L=st.sampled_from([16, 72]), bs=st.sampled_from([2, 16]),
       lens=st.lists(st.integers(0, 90), min_size=3, max_size=3), dtype=DTYPES)
@EXAMPLES
def test_mla_decode(isa, B, h, L, bs, lens, dtype) -> None:
    lens = lens[:B]
    nb = 2 * max(1, sum((n + bs - 1) // bs for n in lens))
    kv, q = torch.randn(nb, bs, L).to(dtype), torch.randn(B, h, L).to(dtype)
    table, sl = _table(lens, bs, nb), torch.tensor(lens, dtype=I32)
    got, want = _both(isa, lambda: omniops.mla_decode(q, kv, table, sl, v_dim=L // 2))
    assert_close(got, want, scale=2.0)


@given(seqs=st.lists(st.integers(0, 9), min_size=1, max_size=3), ctx=st.lists(st.integers(0, 20), min_size=3,
       max_size=3), hkv=st.integers(1, 2), g=st.sampled_from([1, 2]), d=st.sampled_from([8, 16]),
       causal=st.booleans(), dtype=DTYPES, shared=st.booleans())
@EXAMPLES
def test_gqa_prefill_paged(isa, seqs, ctx, hkv, g, d, causal, dtype, shared) -> None:
    ctx, T, bs = ctx[:len(seqs)], sum(seqs), 4
    nb = 2 * max(1, sum((n + bs - 1) // bs for n in ctx))
    kc, vc = _paged(nb, bs, hkv, d, dtype, shared)
    q, k, v = (torch.randn(T, h, d).to(dtype) for h in (hkv * g, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(seqs).cumsum(0).tolist()], dtype=I32)
    table, cl = _table(ctx, bs, nb), torch.tensor(ctx, dtype=I32)
    got, want = _both(isa, lambda: omniops.gqa_prefill(q, k, v, cu, causal=causal, k_cache=kc, v_cache=vc,
                                                       block_table=table, context_lens=cl))
    assert_close(got, want, scale=2.0)


@given(B=st.integers(1, 2), hkv=st.integers(1, 2), g=st.sampled_from([1, 2]), S=st.sampled_from([1, 3, 17]),
       extra=st.sampled_from([0, 5, 40]), d=st.sampled_from([8, 32]), mask=st.sampled_from([None, "bool", "float"]),
       causal=st.booleans(), dtype=DTYPES, sdpa_layout=st.booleans())
@EXAMPLES
def test_gqa_attention(isa, B, hkv, g, S, extra, d, mask, causal, dtype, sdpa_layout) -> None:
    L, hq = S + extra, hkv * g

    def make(h, n):  # [B, h, n, d], from a [B, n, h, d] tensor (HF's projections) when sdpa_layout
        return torch.randn(B, n, h, d).to(dtype).transpose(1, 2) if sdpa_layout else torch.randn(B, h, n, d).to(dtype)

    q, k, v = make(hq, S), make(hkv, L), make(hkv, L)
    m = None
    if mask == "bool":
        m = torch.rand(B, 1, S, L) > 0.3
    elif mask == "float":
        m = torch.randn(1, hq, S, L)
    got, want = _both(isa, lambda: omniops.gqa_attention(q, k, v, m, causal=causal and m is None))
    assert_close(got, want, scale=2.0)


@given(T=st.integers(1, 9), hq=st.integers(1, 3), hk=st.integers(1, 2), hs=st.sampled_from([8, 32]),
       neox=st.booleans(), dtype=DTYPES)
@EXAMPLES
def test_rotary_in_place_on_qkv_slices(isa, T, hq, hk, hs, neox, dtype) -> None:
    """q and k as column slices of one qkv matrix: interleaved rows, no shared element (allowed in place)."""
    cache = torch.randn(32, hs)
    pos = torch.randint(0, 32, (T,))

    def run():
        qkv = base.clone()
        q, k = qkv[:, : hq * hs], qkv[:, hq * hs:(hq + hk) * hs]
        omniops.rotary_embedding_(pos, q, k, cache, hs, is_neox=neox)
        return qkv

    base = torch.randn(T, (hq + 2 * hk) * hs).to(dtype)
    got, want = _both(isa, run)
    assert_close(got, want)


@given(T=st.integers(1, 9), H=st.sampled_from([8, 130]), dtype=DTYPES)
@EXAMPLES
def test_rms_norm_in_place_with_residual(isa, T, H, dtype) -> None:
    x0, r0, w = torch.randn(T, H).to(dtype), torch.randn(T, H).to(dtype), torch.randn(H).to(dtype)

    def run():
        x, r = x0.clone(), r0.clone()
        omniops.rms_norm_(x, w, 1e-6, r)
        return torch.stack([x, r])

    got, want = _both(isa, run)
    assert_close(got, want)


@given(T=st.integers(1, 7), slots=st.integers(1, 5), h=st.integers(1, 2), d=st.sampled_from([8, 16]), dtype=DTYPES)
@EXAMPLES
def test_reshape_and_cache_into_one_kv_tensor(isa, T, slots, h, d, dtype) -> None:
    """k_cache / v_cache as the halves of one [nb, bs, 2, h, d] tensor: outputs that interleave, not overlap."""
    nb, bs = 3, 4
    key, value = torch.randn(T, h, d).to(dtype), torch.randn(T, h, d).to(dtype)
    sm = torch.randperm(nb * bs)[:T]
    sm[0] = -1

    def run():
        kv = torch.zeros(nb, bs, 2, h, d).to(dtype)
        omniops.reshape_and_cache(key, value, kv[:, :, 0], kv[:, :, 1], sm)
        return kv

    got, want = _both(isa, run)
    assert torch.equal(got, want)


@given(T=st.integers(1, 9), E=st.sampled_from([4, 8]), k=st.integers(1, 3), H=st.sampled_from([16, 40]),
       inter=st.sampled_from([8, 24]), dtype=DTYPES, mapped=st.booleans())
@EXAMPLES
def test_route_then_fused_moe(isa, T, E, k, H, inter, dtype, mapped) -> None:
    logits, bias = torch.randn(T, 2 * E if mapped else E), torch.rand(2 * E if mapped else E)
    x = torch.randn(T, H).to(dtype)
    w13, w2 = (torch.randn(E, 2 * inter, H) / H**0.5).to(dtype), (torch.randn(E, H, inter) / inter**0.5).to(dtype)
    emap = torch.tensor([e // 2 if e % 2 == 0 else -1 for e in range(2 * E)], dtype=I32) if mapped else None
    groups = 2

    def run():
        w, ids = omniops.moe_route(logits, k, scoring="sigmoid", num_groups=groups, topk_groups=2,
                                   correction_bias=bias, routed_scaling=2.5)
        return w, ids, omniops.fused_moe(x, w13, w2, w, ids, expert_map=emap)

    (gw, gi, got), (ww, wi, want) = _both(isa, run)
    assert torch.equal(gi, wi)
    assert_close(gw, ww)
    assert_close(got, want, scale=2.0)


# Values the e4m3 rounding treats specially: ties, subnormals (below 2**-6), the largest finite (448), zeros.
SPECIAL = st.sampled_from([0.0, -0.0, 1.0625, 1.1875, 2**-7, 2**-9 * 1.5, 2**-10, 3e-5, 448.0, -447.9, 0.9999,
                           17.0, 1e-3])


@given(m=st.integers(1, 5), k=st.sampled_from([7, 128, 300]), n=st.sampled_from([3, 130]), dtype=DTYPES,
       special=st.lists(SPECIAL, min_size=1, max_size=12))
@EXAMPLES
def test_fp8_block_linear_equals_the_two_step_path(isa, m, k, n, dtype, special) -> None:
    """The fused linear quantizes x in the kernel library (kernels/quant_gemm/fp8_quant.h): its codes and scales
    must equal torch's .to(float8_e4m3fn) path bit for bit, so the two results are identical."""
    x = torch.randn(m, k) * 3
    flat = x.view(-1)
    flat[: len(special)] = torch.tensor(special) * 448.0 / max(max(abs(s) for s in special), 1e-30)
    flat[len(special): 2 * len(special)] = torch.tensor(special)
    x = x.to(dtype)
    qw = quantize_weight(torch.randn(n, k), "fp8_block")
    with _cpu.force_isa(isa), omniops.use_backend("cpu"):
        fused = omniops.fp8_block_linear(x, qw.qweight, qw.scale)
        two_step = omniops.fp8_block_gemm(*quantize_activation_fp8_group(x), qw.qweight, qw.scale, out_dtype=dtype)
    assert torch.equal(fused, two_step)
