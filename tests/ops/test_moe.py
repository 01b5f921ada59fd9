"""MoE ops: every backend vs the per-expert reference loop, routing vs DeepSeek-V3's published formula,
dispatch / grouped GEMM / combine, expert_map, layouts, bad input through Python and _C, opcheck, compile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniops
from omniops import _ext
from omniops.reference import moe as ref
from omniops.testing import assert_close
from tests.ops._cases import BACKEND_CASES, DTYPES, Case, skip_unsupported, strided

# T 0..512, hidden / intermediate sizes that are not multiples of any tile (the CPU tile is 32 weight rows x
# 48 tokens x 512 K; Triton 16 x 64 x 64), and sizes past one K chunk (600 > 512).
TOKENS = st.sampled_from([0, 1, 2, 5, 16, 37, 130, 512])
HIDDEN = st.sampled_from([1, 7, 33, 64, 100, 600])
INTER = st.sampled_from([1, 3, 17, 40, 96])
EXPERTS = st.sampled_from([1, 2, 5, 16, 64])
TOPK = st.integers(1, 8)
PATTERNS = st.sampled_from(["random", "one_expert", "sparse", "skewed"])


def _ids(T: int, E: int, k: int, pattern: str) -> torch.Tensor:
    """topk_ids [T, k]: 'random' (distinct per token when k <= E), 'one_expert' (every pair to expert 0),
    'sparse' (only experts 0 and E-1: the rest get no tokens), 'skewed' (slot 0 always expert E-1)."""
    if pattern == "one_expert":
        return torch.zeros(T, k, dtype=torch.int32)
    if pattern == "sparse":
        return torch.where(torch.rand(T, k) < 0.5, 0, E - 1).to(torch.int32)
    if k <= E:
        ids = torch.rand(T, E).argsort(dim=1)[:, :k]
    else:
        ids = torch.randint(0, E, (T, k))
    if pattern == "skewed":
        ids[:, 0] = E - 1
    return ids.to(torch.int32)


def _moe_inputs(T: int, H: int, inter: int, E: int, k: int, dtype: torch.dtype, pattern: str):
    x = torch.randn(T, H).to(dtype)
    w13 = (torch.randn(E, 2 * inter, H) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter) / inter**0.5).to(dtype)
    weights = torch.softmax(torch.randn(T, k), dim=-1)
    return x, w13, w2, weights, _ids(T, E, k, pattern)


def _small_for_triton(case: Case, T: int, H: int, inter: int, E: int) -> tuple[int, int, int, int]:
    """The Triton interpreter runs every program in numpy: keep its shapes small (the cases still cover
    odd sizes, several tiles and empty experts)."""
    if case.backend != "triton" or case.device != "cpu":
        return T, H, inter, E
    return min(T, 16), min(H, 64), min(inter, 40), min(E, 8)


# ---- fused_moe -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@given(T=TOKENS, H=HIDDEN, inter=INTER, E=EXPERTS, k=TOPK, pattern=PATTERNS,
       layout=st.sampled_from(["contiguous", "rows"]), ids64=st.booleans())
def test_fused_moe_matches_reference(case: Case, dtype, T, H, inter, E, k, pattern, layout, ids64) -> None:
    skip_unsupported(case, dtype, uses_dot=True)
    T, H, inter, E = _small_for_triton(case, T, H, inter, E)
    x, w13, w2, weights, ids = _moe_inputs(T, H, inter, E, k, dtype, pattern)
    expected = ref.fused_moe(x, w13, w2, weights, ids)
    if ids64:
        ids = ids.long()
    with case.active():
        got = omniops.fused_moe(strided(x, layout), w13, w2, weights, ids)
    assert got.shape == (T, H) and got.dtype == dtype
    assert_close(got, expected)


@pytest.mark.parametrize("case", BACKEND_CASES)
@given(T=st.sampled_from([1, 9, 60]), E_global=st.sampled_from([4, 8, 12]), k=st.integers(1, 4),
       ranks=st.sampled_from([2, 4]))
@settings(max_examples=10)
def test_fused_moe_expert_map_partitions_sum_to_whole(case: Case, T, E_global, k, ranks) -> None:
    """Expert parallelism's arithmetic: each rank holds E/ranks experts (expert_map: global -> local or -1);
    the per-rank outputs sum to the single-process result, and absent experts contribute exactly 0."""
    H, inter = 40, 24
    T = _small_for_triton(case, T, H, inter, E_global)[0]
    x, w13, w2, weights, ids = _moe_inputs(T, H, inter, E_global, k, torch.float32, "random")
    whole = ref.fused_moe(x, w13, w2, weights, ids)
    per = E_global // ranks
    total = torch.zeros_like(whole)
    for r in range(ranks):
        emap = torch.full((E_global,), -1, dtype=torch.int32)
        emap[r * per:(r + 1) * per] = torch.arange(per, dtype=torch.int32)
        with case.active():
            part = omniops.fused_moe(x, w13[r * per:(r + 1) * per], w2[r * per:(r + 1) * per], weights, ids,
                                     expert_map=emap)
        assert_close(part, ref.fused_moe(x, w13[r * per:(r + 1) * per], w2[r * per:(r + 1) * per], weights, ids,
                                         expert_map=emap))
        total += part
    assert_close(total, whole, scale=2.0)
    # A map that sends every expert elsewhere gives exactly zero.
    with case.active():
        none_here = omniops.fused_moe(x, w13[:1], w2[:1], weights, ids,
                                      expert_map=torch.full((E_global,), -1, dtype=torch.int32))
    assert torch.equal(none_here, torch.zeros_like(whole))


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_fused_moe_decode_shape_bf16_and_transposed_hidden(case: Case) -> None:
    """A realistic decode call: many experts, most without tokens; hidden as a transposed (column-major)
    view; bf16 (skipped for the Triton interpreter)."""
    for dtype in (torch.float32, torch.bfloat16):
        if case.backend == "triton" and case.device == "cpu" and dtype == torch.bfloat16:
            continue
        x, w13, w2, weights, ids = _moe_inputs(3, 256, 64, 32, 4, dtype, "random")
        expected = ref.fused_moe(x, w13, w2, weights, ids)
        with case.active():
            got = omniops.fused_moe(strided(x, "transposed"), w13, w2, weights, ids)
        assert_close(got, expected)


# ---- routing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@given(T=st.sampled_from([0, 1, 7, 64]), E=st.sampled_from([1, 3, 8, 60, 64, 256]), data=st.data(),
       scoring=st.sampled_from(["softmax", "sigmoid"]), renormalize=st.booleans(), bias=st.booleans(),
       scaling=st.sampled_from([1.0, 2.5]))
def test_route_matches_reference(case: Case, dtype, T, E, data, scoring, renormalize, bias, scaling) -> None:
    skip_unsupported(case, dtype)
    if case.backend == "triton" and case.device == "cpu":
        T = min(T, 7)  # the interpreter handles one token per program iteration
    k = data.draw(st.integers(1, min(E, 8)), label="k")
    groups = data.draw(st.sampled_from([g for g in (None, 2, 4, 8) if g is None or (E % g == 0 and g <= E)]),
                       label="num_groups")
    kw = {}
    if groups:
        per = E // groups
        tg = data.draw(st.integers(max(1, -(-k // per)), groups), label="topk_groups")
        kw = {"num_groups": groups, "topk_groups": tg}
    logits = torch.randn(T, E).to(dtype)
    b = 0.1 * torch.randn(E) if bias else None
    ew, eid = ref.moe_route(logits, k, scoring=scoring, renormalize=renormalize, correction_bias=b,
                            routed_scaling=scaling, **kw)
    with case.active():
        w, ids = omniops.moe_route(logits, k, scoring=scoring, renormalize=renormalize, correction_bias=b,
                                   routed_scaling=scaling, **kw)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (T, k)
    assert torch.equal(ids, eid)
    assert_close(w, ew)


def _hf_deepseek_v3_route(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    """A direct transcription of HF transformers' DeepseekV3TopkRouter / MoEGate (DeepSeek-V3's published
    routing): sigmoid scores, e_score_correction_bias for the choice only, group-limited by the sum of each
    group's top-2, top-k among the kept groups, weights from the unbiased scores, +1e-20 in the denominator."""
    scores = logits.sigmoid()
    scores_for_choice = scores.view(-1, logits.shape[-1]) + bias.unsqueeze(0)
    group_scores = (
        scores_for_choice.view(-1, n_group, logits.shape[-1] // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    )
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1).expand(-1, n_group, logits.shape[-1] // n_group).reshape(-1, logits.shape[-1])
    )
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
    topk_indices = torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if norm_topk_prob:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
        topk_weights /= denominator
    topk_weights = topk_weights * routed_scaling_factor
    return topk_indices, topk_weights


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize(("E", "n_group", "topk_group", "k"), [(256, 8, 4, 8), (64, 8, 3, 6), (16, 4, 2, 3)])
def test_route_deepseek_v3_matches_published_formula(case: Case, E, n_group, topk_group, k) -> None:
    """The transcription masks dropped groups with 0.0 (not -inf): equal to ours whenever the biased scores
    are positive, as here (sigmoid in (0, 1) plus a bias in [0, 0.1))."""
    T = 9 if case.backend == "triton" and case.device == "cpu" else 33
    logits = torch.randn(T, E)
    bias = 0.1 * torch.rand(E)
    for norm in (True, False):
        hf_ids, hf_w = _hf_deepseek_v3_route(logits, bias, k, n_group, topk_group, norm, 2.5)
        with case.active():
            w, ids = omniops.moe_route(logits, k, scoring="sigmoid", renormalize=norm, num_groups=n_group,
                                       topk_groups=topk_group, correction_bias=bias, routed_scaling=2.5)
        # HF returns the top-k unsorted: compare as sets, weights matched by expert id.
        order_hf, order = hf_ids.sort(dim=1), ids.long().sort(dim=1)
        assert torch.equal(order_hf.values, order.values)
        assert_close(w.gather(1, order.indices), hf_w.gather(1, order_hf.indices))


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_route_mixtral_matches_hf(case: Case) -> None:
    """Mixtral / Qwen3-MoE (norm_topk_prob): softmax over all experts in fp32, top-k, renormalise."""
    logits = torch.randn(20, 8, dtype=torch.float32)
    p = torch.softmax(logits, dim=1, dtype=torch.float)
    hf_w, hf_ids = torch.topk(p, 2, dim=-1)
    hf_w /= hf_w.sum(dim=-1, keepdim=True)
    with case.active():
        w, ids = omniops.moe_route(logits, 2)
    assert torch.equal(ids.long(), hf_ids)
    assert_close(w, hf_w)


# ---- dispatch / grouped GEMM / combine -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@given(T=st.sampled_from([0, 1, 5, 37]), H=st.sampled_from([1, 7, 64]), E=st.sampled_from([1, 3, 16]),
       k=st.integers(1, 4), pattern=PATTERNS, block=st.sampled_from([None, 1, 4, 16]))
def test_dispatch_matches_reference(case: Case, dtype, T, H, E, k, pattern, block) -> None:
    skip_unsupported(case, dtype)
    x = torch.randn(T, H).to(dtype)
    ids = _ids(T, E, k, pattern)
    expected = ref.moe_dispatch(x, ids, E, block)
    with case.active():
        got = omniops.moe_dispatch(x, ids, E, block_size=block)
    for name, g, e in zip(got._fields, got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert torch.equal(g, e), name
    assert int(got.expert_counts.sum()) == T * k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@given(T=st.sampled_from([0, 1, 9, 60]), K=st.sampled_from([1, 17, 64, 600]), N=st.sampled_from([1, 20, 70]),
       E=st.sampled_from([1, 4, 9]), k=st.integers(1, 3), pattern=PATTERNS, block=st.sampled_from([None, 16]))
def test_grouped_gemm_matches_reference(case: Case, dtype, T, K, N, E, k, pattern, block) -> None:
    skip_unsupported(case, dtype, uses_dot=True)
    if case.backend == "triton" and case.device == "cpu":
        K, T = min(K, 64), min(T, 16)
    x = torch.randn(T, K).to(dtype)
    w = (torch.randn(E, N, K) / K**0.5).to(dtype)
    d = ref.moe_dispatch(x, _ids(T, E, k, pattern), E, block)
    expected = ref.grouped_gemm(d[0], w, d[2])
    with case.active():
        got = omniops.grouped_gemm(d[0], w, d[2].to(torch.int32))
    assert got.shape == expected.shape and got.dtype == dtype
    assert_close(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@given(T=st.sampled_from([0, 1, 9, 60]), H=st.sampled_from([1, 33, 300]), k=st.integers(1, 8),
       drop=st.booleans(), layout=st.sampled_from(["contiguous", "rows"]))
def test_combine_matches_reference(case: Case, dtype, T, H, k, drop, layout) -> None:
    skip_unsupported(case, dtype)
    M = T * k + 3
    y = torch.randn(M, H).to(dtype)
    inv = torch.randperm(M)[: T * k].view(T, k).to(torch.int32)
    if drop:
        inv[torch.rand(T, k) < 0.3] = -1
    w = torch.rand(T, k)
    expected = ref.moe_combine(y, w, inv)
    with case.active():
        got = omniops.moe_combine(strided(y, layout), w, inv)
    assert_close(got, expected)


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_unfused_pipeline_equals_fused(case: Case) -> None:
    """route -> dispatch -> grouped_gemm(w13) -> silu_and_mul -> grouped_gemm(w2) -> combine == fused_moe."""
    T, H, inter, E, k = 21, 48, 40, 8, 3
    x, w13, w2, _, _ = _moe_inputs(T, H, inter, E, k, torch.float32, "random")
    with case.active():
        w, ids = omniops.moe_route(torch.randn(T, E), k)
        d = omniops.moe_dispatch(x, ids, E, block_size=4)
        h = omniops.silu_and_mul(omniops.grouped_gemm(d.x_sorted, w13, d.expert_offsets))
        y = omniops.grouped_gemm(h, w2, d.expert_offsets)
        unfused = omniops.moe_combine(y, w, d.inverse_index)
        fused = omniops.fused_moe(x, w13, w2, w, ids)
    assert_close(unfused, fused)
    assert_close(fused, ref.fused_moe(x, w13, w2, w, ids))


# ---- T = 0, bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", BACKEND_CASES)
def test_empty_tokens(case: Case) -> None:
    x, w13, w2, weights, ids = _moe_inputs(0, 16, 8, 4, 2, torch.float32, "random")
    with case.active():
        assert omniops.fused_moe(x, w13, w2, weights, ids).shape == (0, 16)
        w, i = omniops.moe_route(torch.randn(0, 4), 2)
        assert w.shape == (0, 2) and i.shape == (0, 2)
        d = omniops.moe_dispatch(x, ids, 4)
        assert d.x_sorted.shape == (0, 16) and d.expert_counts.tolist() == [0, 0, 0, 0]
        assert omniops.moe_combine(d.x_sorted, weights, d.inverse_index).shape == (0, 16)


def _fused_args(**over):
    T, H, inter, E, k = 3, 8, 4, 4, 2
    a = {"hidden": torch.randn(T, H), "w13": torch.randn(E, 2 * inter, H), "w2": torch.randn(E, H, inter),
         "topk_weights": torch.rand(T, k), "topk_ids": torch.randint(0, E, (T, k), dtype=torch.int32),
         "activation": "silu", "expert_map": None}
    return a | over


@pytest.mark.parametrize(
    ("over", "exc", "match"),
    [
        ({"hidden": torch.randn(3, 8, dtype=torch.float64)}, TypeError, "hidden: expected dtype"),
        ({"hidden": torch.randn(3, 2, 8)}, ValueError, "hidden: expected a 2-D"),
        ({"w13": torch.randn(4, 8, 8, dtype=torch.bfloat16)}, TypeError, "w13: expected dtype float32"),
        ({"w13": torch.randn(4, 7, 8)}, ValueError, r"w13: expected shape \[experts, 2\*intermediate, 8\]"),
        ({"w13": torch.randn(4, 8, 9)}, ValueError, "w13: expected shape"),
        ({"w2": torch.randn(4, 8, 5)}, ValueError, r"w2: expected shape \[4, 8, 4\]"),
        ({"w2": torch.randn(3, 8, 4)}, ValueError, "w2: expected shape"),
        ({"topk_ids": torch.randint(0, 4, (3, 2)).float()}, TypeError, "topk_ids: expected dtype"),
        ({"topk_ids": torch.randint(0, 4, (2, 2), dtype=torch.int32)}, ValueError, "topk_ids: expected shape"),
        ({"topk_ids": torch.tensor([[0, 4], [1, 2], [0, 0]], dtype=torch.int32)}, ValueError, r"topk_ids: values"),
        ({"topk_ids": torch.tensor([[0, -1], [1, 2], [0, 0]], dtype=torch.int32)}, ValueError, r"topk_ids: values"),
        ({"topk_weights": torch.rand(3, 3)}, ValueError, "topk_weights: expected shape"),
        ({"topk_weights": torch.randint(0, 2, (3, 2))}, TypeError, "topk_weights: expected dtype"),
        ({"activation": "relu"}, ValueError, "activation"),
        ({"expert_map": torch.tensor([0, 1, 5], dtype=torch.int32)}, ValueError, "expert_map: values"),
        ({"expert_map": torch.tensor([0, 1], dtype=torch.int32)}, ValueError, "topk_ids: values"),
        ({"expert_map": torch.tensor([0.0, 1.0])}, TypeError, "expert_map: expected dtype"),
        ({"hidden": "x"}, TypeError, "hidden: expected a torch.Tensor"),
    ],
)
def test_fused_moe_bad_input(over, exc, match) -> None:
    a = _fused_args(**over)
    with pytest.raises(exc, match=match):
        omniops.fused_moe(a["hidden"], a["w13"], a["w2"], a["topk_weights"], a["topk_ids"],
                          activation=a["activation"], expert_map=a["expert_map"])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"top_k": 9}, ValueError, r"top_k: expected an int in \[1, 8\]"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"scoring": "tanh"}, ValueError, "scoring"),
        ({"num_groups": 3, "topk_groups": 1}, ValueError, "num_groups"),
        ({"num_groups": 4, "topk_groups": 5}, ValueError, "topk_groups"),
        ({"num_groups": 4, "topk_groups": 1, "top_k": 3}, ValueError, "top_k: 3 exceeds"),
        ({"topk_groups": 2}, ValueError, "without num_groups"),
        ({"correction_bias": torch.randn(7)}, ValueError, "correction_bias: expected shape"),
        ({"routed_scaling": float("inf")}, ValueError, "routed_scaling"),
    ],
)
def test_route_bad_input(kwargs, exc, match) -> None:
    a = {"top_k": 2} | kwargs
    with pytest.raises(exc, match=match):
        omniops.moe_route(torch.randn(4, 8), a.pop("top_k"), **a)


def test_route_logits_dtype_error() -> None:
    with pytest.raises(TypeError, match="router_logits: expected dtype"):
        omniops.moe_route(torch.randint(0, 3, (4, 8)), 2)


def test_dispatch_gemm_combine_bad_input() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="topk_ids: values"):
        omniops.moe_dispatch(x, torch.tensor([[0], [1], [2], [3]]), 3)
    with pytest.raises(ValueError, match="topk_ids: expected 4 rows"):
        omniops.moe_dispatch(x, torch.zeros(3, 1, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="block_size"):
        omniops.moe_dispatch(x, torch.zeros(4, 1, dtype=torch.int32), 3, block_size=0)
    with pytest.raises(ValueError, match="expert_offsets: must be non-decreasing"):
        omniops.grouped_gemm(x, torch.randn(2, 5, 8), torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match="expert_offsets: must be non-decreasing"):
        omniops.grouped_gemm(x, torch.randn(2, 5, 8), torch.tensor([0, 3, 5]))
    with pytest.raises(ValueError, match=r"expert_offsets: expected shape \[3\]"):
        omniops.grouped_gemm(x, torch.randn(2, 5, 8), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"w: expected shape \[experts, N, 8\]"):
        omniops.grouped_gemm(x, torch.randn(2, 5, 7), torch.tensor([0, 2, 4]))
    with pytest.raises(TypeError, match="w: expected dtype float32"):
        omniops.grouped_gemm(x, torch.randn(2, 5, 8).half(), torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="inverse_index: values"):
        omniops.moe_combine(x, torch.rand(2, 2), torch.tensor([[0, 1], [2, 4]]))
    with pytest.raises(ValueError, match="topk_weights: expected shape"):
        omniops.moe_combine(x, torch.rand(2, 3), torch.tensor([[0, 1], [2, 3]]))


@pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")
@pytest.mark.parametrize(
    ("fn", "exc", "match"),
    [
        (lambda C, a: C.fused_moe(a["out"], a["hidden"], a["w13"], a["w2"], a["w"], a["ids"].long()), TypeError,
         "topk_ids: expected dtype int32, got int64"),
        (lambda C, a: C.fused_moe(a["out"], a["hidden"], a["w13"], a["w2"], a["w"], a["ids"] + 4), ValueError,
         "topk_ids: values"),
        (lambda C, a: C.fused_moe(a["out"], a["hidden"], a["w13"], a["w2"].transpose(1, 2).contiguous()
                                  .transpose(1, 2), a["w"], a["ids"]), ValueError, "w2: must be contiguous"),
        (lambda C, a: C.fused_moe(a["out"], a["hidden"], a["w13"][:, :7], a["w2"], a["w"], a["ids"]), ValueError,
         "w13"),
        (lambda C, a: C.fused_moe(a["out"][:2], a["hidden"], a["w13"], a["w2"], a["w"], a["ids"]), ValueError,
         "out: expected shape"),
        (lambda C, a: C.fused_moe(a["out"], a["hidden"], a["w13"], a["w2"], a["w"].double(), a["ids"]), TypeError,
         "topk_weights"),
        (lambda C, a: C.fused_moe(a["out"], a["hidden"], a["w13"], a["w2"], a["w"], a["ids"], "gelu"), ValueError,
         "activation"),
        (lambda C, a: C.fused_moe(a["out"], a["hidden"], a["w13"], a["w2"], a["w"], a["ids"], "silu",
                                  torch.tensor([0, 1, 2, 9], dtype=torch.int32)), ValueError, "expert_map: values"),
        (lambda C, a: C.fused_moe(a["hidden"][:, 1:], a["hidden"][:, :7], a["w13"][:, :, :7].contiguous(),
                                  a["w2"][:, :7].contiguous(), a["w"], a["ids"]), ValueError, "partially overlaps"),
        (lambda C, a: C.fused_moe(a["w13"][0, :3], a["hidden"], a["w13"], a["w2"], a["w"], a["ids"]), ValueError,
         "out must not overlap w13"),
        (lambda C, a: C.moe_route(a["w"], a["ids"], torch.randn(3, 4), 5, "softmax", True, 0, 0), ValueError,
         "top_k"),
        (lambda C, a: C.moe_route(a["w"], a["ids"], torch.randn(3, 4), 2, "softmax", True, 3, 1), ValueError,
         "num_groups"),
        (lambda C, a: C.moe_route(a["w"][:, :1], a["ids"], torch.randn(3, 4), 2, "softmax", True, 0, 0),
         ValueError, "topk_weights: expected shape"),
        (lambda C, a: C.moe_dispatch(torch.empty(6, 8), torch.empty(6, dtype=torch.int32),
                                     torch.empty(5, dtype=torch.long), torch.empty(4, dtype=torch.int32),
                                     torch.empty(3, 2, dtype=torch.int32), a["hidden"], a["ids"] + 9, 4),
         ValueError, "topk_ids: values"),
        (lambda C, a: C.grouped_gemm(torch.empty(3, 5), a["hidden"], torch.randn(2, 5, 8),
                                     torch.tensor([0, 2, 4])), ValueError, "expert_offsets: must be non-decr"),
        (lambda C, a: C.moe_combine(torch.empty(3, 8), a["hidden"], a["w"], a["ids"] + 3), ValueError,
         "inverse_index: values"),
        (lambda C, a: C.moe_combine(torch.empty(3, 8), a["hidden"], a["w"], a["ids"] - 2), ValueError,
         "inverse_index: values"),
    ],
)
def test_cpp_entry_points_reject_bad_input(fn, exc, match) -> None:
    """omniops._C is reachable directly: every index is range-checked there before a kernel runs."""
    a = {"out": torch.empty(3, 8), "hidden": torch.randn(3, 8), "w13": torch.randn(4, 8, 8),
         "w2": torch.randn(4, 8, 4), "w": torch.rand(3, 2), "ids": torch.randint(0, 4, (3, 2), dtype=torch.int32)}
    with pytest.raises(exc, match=match):
        fn(_ext.cpp(), a)


# ---- opcheck, compile ------------------------------------------------------------------------------------
def test_opcheck() -> None:
    x, w13, w2, weights, ids = _moe_inputs(5, 16, 8, 4, 2, torch.float32, "random")
    ops = torch.ops.omni
    torch.library.opcheck(ops.fused_moe.default, (x, w13, w2, weights, ids, "silu", None))
    emap = torch.tensor([1, -1, 0, 2, 3, -1], dtype=torch.int32)
    torch.library.opcheck(ops.fused_moe.default, (x, w13, w2, weights, ids + 2, "silu", emap))
    torch.library.opcheck(ops.moe_route.default, (torch.randn(5, 8), 2, "softmax", True, 0, 0, None, 1.0))
    torch.library.opcheck(ops.moe_route.default, (torch.randn(5, 8), 3, "sigmoid", True, 4, 2, torch.rand(8), 2.5))
    torch.library.opcheck(ops.moe_dispatch.default, (x, ids, 4, 4))
    d = omniops.moe_dispatch(x, ids, 4)
    torch.library.opcheck(ops.grouped_gemm.default, (d.x_sorted, w13, d.expert_offsets))
    torch.library.opcheck(ops.moe_combine.default, (d.x_sorted, weights, d.inverse_index))


@pytest.mark.compile
def test_torch_compile() -> None:
    x, w13, w2, _, _ = _moe_inputs(6, 16, 8, 4, 2, torch.float32, "random")
    logits = torch.randn(6, 4)

    def block(x, logits):
        w, ids = omniops.moe_route(logits, 2)
        return omniops.fused_moe(x, w13, w2, w, ids) + 1.0

    compiled = torch.compile(block, fullgraph=True)
    assert_close(compiled(x, logits), block(x, logits))
