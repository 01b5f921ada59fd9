"""Paged attention (omniops/ops/attention.py: gqa_decode, mla_decode, gqa_prefill): every backend vs the
reference, with shuffled block tables and NaN in every cache slot a sequence does not own (so any out-of-range
read shows up as NaN), cross-checks against torch SDPA and an un-absorbed DeepSeek-V3 MLA layer, opcheck,
torch.compile (with the cache writes of omniops/ops/cache_ops.py), and bad input through Python and straight
into omniops._C."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import omniops
from omniops import _cpu, _ext
from omniops.reference import attention as ref
from omniops.testing import assert_close
from tests.ops._cases import BACKEND_CASES, DTYPES, Case, skip_unsupported
from tests.ops._paged import make_paged, small_inputs


def _tol_scale(dtype: torch.dtype) -> float:
    # Attention outputs are convex combinations of V rows: a few fp32 roundings more than the reference order.
    return 2.0 if dtype == torch.float32 else 1.0


LENS_CI = st.lists(st.integers(0, 300), min_size=0, max_size=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@settings(max_examples=8)
@given(lens=LENS_CI, bs=st.sampled_from([16, 64, 128]), hkv=st.sampled_from([1, 2]),
       g=st.sampled_from([1, 2, 4, 8, 16]), d=st.sampled_from([64, 128]), extra=st.sampled_from(["", "cap", "win"]),
       data=st.data())
def test_gqa_decode_matches_reference(case: Case, dtype, lens, bs, hkv, g, d, extra, data) -> None:
    skip_unsupported(case, dtype, uses_dot=True)
    if case.backend == "triton":  # the interpreter is slow: small contexts and groups
        lens = [min(n, 40) for n in lens][:3]
        g = min(g, 4)
    (kc, vc), table, sl = make_paged(lens, bs, ((hkv, d), (hkv, d)), dtype, case.device)
    q = torch.randn(len(lens), hkv * g, d, device=case.device).to(dtype)
    cap = 4.0 if extra == "cap" else None
    win = data.draw(st.integers(1, 64)) if extra == "win" else None
    expected = ref.gqa_decode(q, kc, vc, table, sl, 1 / math.sqrt(d), cap, win)
    with case.active():
        got = omniops.gqa_decode(q, kc, vc, table, sl, soft_cap=cap, window=win)
    assert got.shape == (len(lens), hkv * g, d) and got.dtype == dtype
    assert not got.isnan().any()
    assert_close(got, expected, scale=_tol_scale(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@settings(max_examples=6)
@given(lens=LENS_CI, bs=st.sampled_from([16, 64, 128]), heads=st.sampled_from([1, 16, 128]))
def test_mla_decode_matches_reference(case: Case, dtype, lens, bs, heads) -> None:
    skip_unsupported(case, dtype, uses_dot=True)
    if case.backend == "triton":
        lens = [min(n, 24) for n in lens][:2]
        heads = min(heads, 16)
    (kv,), table, sl = make_paged(lens, bs, ((576,),), dtype, case.device)
    q = torch.randn(len(lens), heads, 576, device=case.device).to(dtype)
    scale = 192**-0.5
    expected = ref.mla_decode(q, kv, table, sl, scale)
    with case.active():
        got = omniops.mla_decode(q, kv, table, sl, scale)
    assert got.shape == (len(lens), heads, 512)
    assert not got.isnan().any()
    assert_close(got, expected, scale=_tol_scale(dtype))


def _cpu_isas() -> list[str]:
    if _ext.cpp() is None:
        return []
    return [isa for isa in ("amx", "avx512", "avx2") if isa in omniops.cpu_info()["available_isas"]]


@pytest.mark.skipif(not _cpu_isas(), reason="omniops._C is not built: no CPU kernel library to run")
@pytest.mark.parametrize("isa", _cpu_isas() or ["none"])
@pytest.mark.parametrize("shape", ["mla16", "mla128", "gqa2x4", "gqa2x8", "gqa1x24", "gqa2x16win", "gqa4x1bs24",
                                   "gqa2x2", "gqa2x3bs24win", "gqa1x6bs8"])
def test_fp32_decode_heads_in_lanes(isa: str, shape: str) -> None:
    """fp32 decode on every CPU library here (amx / avx512: the heads-in-lanes kernel of lane_decode.h for more
    than 8 rows per kv head, the dot form of dot_decode.h for 1-8 (padded to 1, 2, 4, 8); avx2: the general
    kernel): lane groups past 16 rows, partial last chunks, empty sequences, windows, chunks across cache blocks
    (block sizes 8 and 24) and a context long enough for key splits, against the reference with NaN outside."""
    lens = [0, 1, 15, 17, 300, 2100]
    win = None
    if shape.startswith("mla"):
        heads = int(shape[3:])
        (kv,), table, sl = make_paged(lens, 16, ((576,),), torch.float32)
        q = torch.randn(len(lens), heads, 576)
        expected = ref.mla_decode(q, kv, table, sl, 192**-0.5)
        with _cpu.force_isa(isa):
            got = omniops.mla_decode(q, kv, table, sl, 192**-0.5)
    else:
        dims, _, rest = shape[3:].partition("bs")
        hkv, g = (int(x) for x in dims.removesuffix("win").split("x"))
        bs = int(rest.removesuffix("win") or 16)
        win = 40 if shape.endswith("win") else None
        (kc, vc), table, sl = make_paged(lens, bs, ((hkv, 64), (hkv, 64)), torch.float32)
        q = torch.randn(len(lens), hkv * g, 64)
        expected = ref.gqa_decode(q, kc, vc, table, sl, 0.125, None, win)
        with _cpu.force_isa(isa):
            got = omniops.gqa_decode(q, kc, vc, table, sl, scale=0.125, window=win)
    assert not got.isnan().any()
    assert_close(got, expected, scale=_tol_scale(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@settings(max_examples=6)
@given(new=st.lists(st.integers(0, 40), min_size=1, max_size=3), ctx=st.lists(st.integers(0, 60), min_size=3,
       max_size=3), paged=st.booleans(), causal=st.booleans(), dims=st.sampled_from([(64, 64), (128, 128), (192, 128)]),
       hkv=st.sampled_from([1, 2]), g=st.sampled_from([1, 4, 16]), bs=st.sampled_from([16, 64, 128]))
def test_gqa_prefill_matches_reference(case: Case, dtype, new, ctx, paged, causal, dims, hkv, g, bs) -> None:
    skip_unsupported(case, dtype, uses_dot=True)
    d, dv = dims
    if case.backend == "triton":
        new, ctx, g = [min(n, 20) for n in new][:2], [min(c, 20) for c in ctx], min(g, 4)
    B = len(new)
    T = sum(new)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=case.device)
    q = torch.randn(T, hkv * g, d, device=case.device).to(dtype)
    k = torch.randn(T, hkv, d, device=case.device).to(dtype)
    v = torch.randn(T, hkv, dv, device=case.device).to(dtype)
    cache = {}
    if paged:
        (kc, vc), table, cl = make_paged(ctx[:B], bs, ((hkv, d), (hkv, dv)), dtype, case.device)
        cache = {"k_cache": kc, "v_cache": vc, "block_table": table, "context_lens": cl}
    expected = ref.gqa_prefill(q, k, v, cu, causal, d**-0.5, *cache.values())
    with case.active():
        got = omniops.gqa_prefill(q, k, v, cu, causal=causal, **cache)
    assert got.shape == (T, hkv * g, dv)
    assert not got.isnan().any()
    assert_close(got, expected, scale=_tol_scale(dtype))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("g", [1, 4, 16, 32])
def test_gqa_prefill_long_bf16(causal, g) -> None:
    """Longer varlen steps in bf16 (the cpu backend's AMX prefill on the amx library: query tiles over several
    online-softmax blocks of keys, chunks with cached context, one-token rows beside them) against the fp32
    reference."""
    torch.manual_seed(g)
    new, ctx, hkv, d, dv = [300, 1, 77, 0], [450, 290, 0, 33], 2, 128, 128
    dt = torch.bfloat16
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    q, k = torch.randn(sum(new), hkv * g, d).to(dt), torch.randn(sum(new), hkv, d).to(dt)
    v = torch.randn(sum(new), hkv, dv).to(dt)
    (kc, vc), table, cl = make_paged(ctx, 16, ((hkv, d), (hkv, dv)), dt)
    f = [x.float() for x in (q, k, v, kc, vc)]
    expected = ref.gqa_prefill(*f[:3], cu, causal, d**-0.5, f[3], f[4], table, cl)
    got = omniops.gqa_prefill(q, k, v, cu, causal=causal, k_cache=kc, v_cache=vc, block_table=table,
                              context_lens=cl)
    assert not got.isnan().any()
    assert_close(got, expected.to(dt), scale=_tol_scale(dt))


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_edge_cases(case: Case) -> None:
    """Empty batch, length-0 and length-1 sequences, a block size not dividing the length."""
    dt = torch.float32
    (kc, vc), table, sl = make_paged([1, 0, 17], 16, ((2, 64), (2, 64)), dt, case.device)
    q = torch.randn(3, 4, 64, device=case.device)
    with case.active():
        got = omniops.gqa_decode(q, kc, vc, table, sl)
        empty = omniops.gqa_decode(q[:0], kc, vc, table[:0], sl[:0])
        (kv,), t2, s2 = make_paged([1, 0], 16, ((576,),), dt, case.device)
        mla = omniops.mla_decode(torch.randn(2, 16, 576, device=case.device), kv, t2, s2)
        mla_empty = omniops.mla_decode(torch.randn(0, 16, 576, device=case.device), kv, t2[:0], s2[:0])
    assert empty.shape == (0, 4, 64) and mla_empty.shape == (0, 16, 512)
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(mla[1], torch.zeros_like(mla[1]))
    # A single key: softmax is 1, the output is that key's value row.
    blk = int(table[0, 0])
    assert_close(got[0], vc[blk, 0].repeat_interleave(2, dim=0))
    assert_close(got, ref.gqa_decode(q, kc, vc, table, sl, 0.125))


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_prefill_equals_sdpa(case: Case, dtype) -> None:
    """Causal varlen prefill == torch SDPA (is_causal) run per sequence, GQA via enable_gqa."""
    skip_unsupported(case, dtype, uses_dot=True)
    lens = [7, 1, 23] if case.backend != "triton" else [5, 1, 9]
    hq, hkv, d = 8, 2, 64
    T = sum(lens)
    q = torch.randn(T, hq, d, device=case.device).to(dtype)
    k = torch.randn(T, hkv, d, device=case.device).to(dtype)
    v = torch.randn(T, hkv, d, device=case.device).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=case.device)
    with case.active():
        got = omniops.gqa_prefill(q, k, v, cu, causal=True)
    for b, (t0, t1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=False)):
        sd = F.scaled_dot_product_attention(q[t0:t1].float().transpose(0, 1), k[t0:t1].float().transpose(0, 1),
                                            v[t0:t1].float().transpose(0, 1), is_causal=True, enable_gqa=True)
        assert_close(got[t0:t1], sd.transpose(0, 1).to(dtype), scale=_tol_scale(dtype), msg=f"sequence {b}")


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_mla_decode_equals_unabsorbed_deepseek_v3(case: Case) -> None:
    """Absorbed MLA decode (mla_decode on the latent cache) == DeepSeek-V3's attention with explicit per-head
    keys/values k = kv_c @ W_UK, v = kv_c @ W_UV (qk_nope 128, rope 64, v_head 128, kv_lora_rank 512)."""
    H, rank, rope, nope, vh, bs = 4, 512, 64, 128, 128, 16
    lens = [19, 40] if case.backend != "triton" else [9, 17]
    (kv,), table, sl = make_paged(lens, bs, ((rank + rope,),), torch.float32, case.device)
    w_uk = torch.randn(H, rank, nope, device=case.device) / math.sqrt(rank)
    w_uv = torch.randn(H, rank, vh, device=case.device) / math.sqrt(rank)
    q_nope = torch.randn(len(lens), H, nope, device=case.device)
    q_pe = torch.randn(len(lens), H, rope, device=case.device)
    scale = (nope + rope) ** -0.5
    q_abs = torch.cat((torch.einsum("bhn,hrn->bhr", q_nope, w_uk), q_pe), dim=-1)
    with case.active():
        lat = omniops.mla_decode(q_abs, kv, table, sl, scale, v_dim=rank)
    got = torch.einsum("bhr,hrv->bhv", lat, w_uv)
    for b, n in enumerate(lens):
        rows = ref._gather(kv, table[b], n)
        kv_c, k_pe = rows[:, :rank], rows[:, rank:]
        k = torch.cat((torch.einsum("tr,hrn->htn", kv_c, w_uk), k_pe.expand(H, n, rope)), dim=-1)
        v = torch.einsum("tr,hrv->htv", kv_c, w_uv)
        qh = torch.cat((q_nope[b], q_pe[b]), dim=-1)[:, None, :]  # [H, 1, 192]
        expected = F.scaled_dot_product_attention(qh, k, v, scale=scale)[:, 0]
        assert_close(got[b], expected, scale=10.0, msg=f"sequence {b}")  # two different fp32 reduction orders


def test_opcheck() -> None:
    kc, vc, table, sl, kv, t2, s2 = small_inputs()
    kc, vc, kv = (torch.nan_to_num(x) for x in (kc, vc, kv))  # opcheck compares outputs with NaN-unsafe checks
    ops = torch.ops.omni
    q = torch.randn(2, 4, 16)
    torch.library.opcheck(ops.gqa_decode.default, (q, kc, vc, table, sl, 0.25, 0.0, 0, True))
    torch.library.opcheck(ops.mla_decode.default, (torch.randn(2, 3, 40), kv, t2, s2, 0.2, 32, True))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    qp, kp, vp = torch.randn(7, 4, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    torch.library.opcheck(ops.gqa_prefill.default, (qp, kp, vp, cu, True, 0.25, None, None, None, None, True))
    torch.library.opcheck(ops.gqa_prefill.default, (qp, kp, vp, cu, True, 0.25, kc, vc, table, sl, True))


@pytest.mark.compile
def test_torch_compile_all_ops() -> None:
    """All five ops in one compiled function (one Inductor compile keeps CI time down): compiled == eager."""
    kc, vc, table, sl, kv, t2, s2 = small_inputs()
    q, qm = torch.randn(2, 4, 16), torch.randn(2, 3, 40)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    qp, kp, vp = torch.randn(7, 4, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    slots = torch.tensor([3, -1, 17, 40, 2, 9, 33])

    def f(kc, vc, kv):
        omniops.reshape_and_cache(kp, vp, kc, vc, slots)
        omniops.mla_cache(kp.reshape(7, 32), vp[:, 0, :8], kv, slots)
        a = omniops.gqa_decode(q, kc, vc, table, sl)
        b = omniops.mla_decode(qm, kv, t2, s2, v_dim=32)
        c = omniops.gqa_prefill(qp, kp, vp, cu, k_cache=kc, v_cache=vc, block_table=table, context_lens=sl)
        return a, b, c

    eager_in = [x.clone() for x in (kc, vc, kv)]
    comp_in = [x.clone() for x in (kc, vc, kv)]
    expected = f(*eager_in)
    got = torch.compile(f, fullgraph=True)(*comp_in)
    for e, g in zip(expected, got, strict=False):
        assert_close(g, e)
    for e, g in zip(eager_in, comp_in, strict=False):
        assert torch.equal(torch.nan_to_num(e), torch.nan_to_num(g))


def _bad_decode_args(**kw):
    kc, vc, table, sl, *_ = small_inputs()
    args = {"q": torch.randn(2, 4, 16), "k_cache": kc, "v_cache": vc, "block_table": table, "seq_lens": sl}
    args.update(kw)
    return args


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"q": torch.randn(2, 3, 16)}, ValueError, "q: q_heads=3 must be a multiple of kv_heads=2"),
        ({"q": torch.randn(2, 4, 8)}, ValueError, "k_cache: expected shape"),
        ({"q": torch.randn(2, 4, 16, dtype=torch.float16)}, ValueError, "k_cache: expected dtype float16"),
        ({"q": torch.randn(2, 4, 16, dtype=torch.float64)}, TypeError, "q: expected dtype"),
        ({"q": torch.randn(2, 4, 16, device="meta")}, ValueError, "k_cache: expected device meta"),
        ({"v_cache": torch.randn(3, 16, 2, 16)}, ValueError, "v_cache: expected shape"),
        ({"block_table": torch.zeros(2, 3, dtype=torch.int64)}, TypeError, "block_table: expected dtype"),
        ({"block_table": torch.zeros(3, 3, dtype=torch.int32)}, ValueError, "block_table: expected shape"),
        ({"seq_lens": torch.tensor([5, 49], dtype=torch.int32)}, ValueError, r"seq_lens\[1\] = 49 is outside"),
        ({"seq_lens": torch.tensor([-1, 3], dtype=torch.int32)}, ValueError, r"seq_lens\[0\] = -1"),
        ({"block_table": torch.tensor([[0, 1, 2], [99, 0, 0]], dtype=torch.int32)}, ValueError,
         r"block_table\[1, 0\] = 99 is outside"),
        ({"block_table": torch.tensor([[-1, 1, 2], [0, 1, 2]], dtype=torch.int32)}, ValueError,
         r"block_table\[0, 0\] = -1"),
    ],
)
def test_bad_input_decode(kw, exc, match) -> None:
    with pytest.raises(exc, match=match):
        omniops.gqa_decode(**_bad_decode_args(**kw))


def test_bad_input_other_ops() -> None:
    kc, vc, table, sl, kv, t2, s2 = small_inputs()
    with pytest.raises(ValueError, match="kv_cache: expected shape"):
        omniops.mla_decode(torch.randn(2, 4, 39), kv, t2, s2)
    with pytest.raises(ValueError, match="v_dim"):
        omniops.mla_decode(torch.randn(2, 4, 40), kv, t2, s2, v_dim=41)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\]"):
        omniops.mla_decode(torch.randn(2, 4, 40), kv, torch.tensor([[0, 1], [2, 77]], dtype=torch.int32), s2, v_dim=32)
    q, k, v = torch.randn(7, 4, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        omniops.gqa_prefill(q, k, v, torch.tensor([0, 5, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        omniops.gqa_prefill(q, k, v, torch.tensor([0, 5, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="pass all four"):
        omniops.gqa_prefill(q, k, v, torch.tensor([0, 7], dtype=torch.int32), k_cache=kc)
    with pytest.raises(ValueError, match="context_lens"):
        omniops.gqa_prefill(q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), k_cache=kc, v_cache=vc,
                            block_table=table, context_lens=torch.tensor([0, 99], dtype=torch.int32))
    with pytest.raises(ValueError, match="q: q_heads=4 must be a multiple of kv_heads=3"):
        omniops.gqa_prefill(q, torch.randn(7, 3, 16), torch.randn(7, 3, 16), torch.tensor([0, 7], dtype=torch.int32))


def test_validate_false_skips_value_checks() -> None:
    """validate=False skips the value pass; the cpu binding still refuses bad indices before any read."""
    args = _bad_decode_args(block_table=torch.tensor([[0, 1, 2], [99, 0, 0]], dtype=torch.int32))
    with omniops.use_backend("reference"), pytest.raises(IndexError):
        omniops.gqa_decode(**args, validate=False)  # the reference's own gather fails: no value check ran
    if _ext.cpp() is not None:
        with omniops.use_backend("cpu"), pytest.raises(ValueError, match=r"block_table\[1, 0\] = 99"):
            omniops.gqa_decode(**args, validate=False)


@pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")
@pytest.mark.parametrize(
    ("name", "mutate", "match"),
    [
        ("gqa_decode", lambda a: a.update(seq_lens=torch.tensor([5, 49], dtype=torch.int32)), "seq_lens"),
        ("gqa_decode", lambda a: a.update(block_table=torch.tensor([[0, 1, 2], [3, 99, 0]], dtype=torch.int32)),
         r"block_table\[1, 1\] = 99"),
        ("gqa_decode", lambda a: a.update(q=torch.randn(2, 3, 16)), "multiple of kv_heads"),
        ("gqa_decode", lambda a: a.update(out=torch.empty(2, 4, 15)), "out: expected shape"),
        ("gqa_decode", lambda a: a.update(q=torch.randn(2, 4, 16).half()), "k_cache: expected dtype"),
        ("gqa_decode", lambda a: a.update(seq_lens=torch.tensor([5, 18])), "seq_lens: expected dtype int32"),
        ("gqa_decode", lambda a: a.update(window=-1), "window"),
        ("gqa_decode", lambda a: a.update(k_cache=a["k_cache"].transpose(2, 3)), "contiguous|expected shape"),
        ("mla_decode", lambda a: a.update(v_dim=41), "v_dim"),
        ("mla_decode", lambda a: a.update(block_table=torch.tensor([[0, 1], [2, -3]], dtype=torch.int32)),
         r"block_table\[1, 1\] = -3"),
        ("gqa_prefill", lambda a: a.update(cu_seqlens=torch.tensor([0, 9, 7], dtype=torch.int32)), "non-decreasing"),
        ("gqa_prefill", lambda a: a.update(cu_seqlens=torch.tensor([1, 7], dtype=torch.int32)), r"cu_seqlens\[0\]"),
        ("gqa_prefill", lambda a: a.update(context_lens=torch.tensor([0, 999], dtype=torch.int32)), "context_lens"),
        ("gqa_prefill", lambda a: a.update(k_cache=None), "go together"),
    ],
)
def test_cpp_entry_point_rejects_bad_input(name, mutate, match) -> None:
    """omniops._C checks shapes, dtypes and every index value itself, before any kernel reads memory."""
    kc, vc, table, sl, kv, t2, s2 = small_inputs()
    k, v = torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    args = {
        "gqa_decode": dict(out=torch.empty(2, 4, 16), q=torch.randn(2, 4, 16), k_cache=kc, v_cache=vc,
                           block_table=table, seq_lens=sl, scale=0.25, soft_cap=0.0, window=0),
        "mla_decode": dict(out=torch.empty(2, 4, 32), q=torch.randn(2, 4, 40), kv_cache=kv, block_table=t2,
                           seq_lens=s2, scale=0.2, v_dim=32),
        "gqa_prefill": dict(out=torch.empty(7, 4, 16), q=torch.randn(7, 4, 16), k=k, v=v,
                            cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), causal=True, scale=0.25,
                            k_cache=kc, v_cache=vc, block_table=table, context_lens=sl),
    }[name]
    mutate(args)
    if name == "mla_decode" and args["v_dim"] != 32:
        args["out"] = torch.empty(2, 4, args["v_dim"])
    with pytest.raises((ValueError, TypeError), match=match):
        getattr(_ext.cpp(), name)(**args)
