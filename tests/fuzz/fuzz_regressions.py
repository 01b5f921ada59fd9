"""The concrete cases of issue 18 ("four crashes and silent aliasing found by fuzzing"), one function each.

Each must raise ValueError / TypeError naming the argument; they run in a child process (fuzz_runner), so the
crashes they used to be are failing tests. Calls go straight into omniops._C (``C``) and through the public ops
(on the cpu backend and, where the reference would not need the kernels' limits, on the reference too).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

import omniops
from omniops import _ext
from omniops._validation import check_block_table

I32 = torch.int32
REGRESSIONS: dict[str, Callable[[], None]] = {}


def regression(fn: Callable[[], None]) -> Callable[[], None]:
    REGRESSIONS[fn.__name__] = fn
    return fn


def raises(exc: type[Exception] | tuple[type[Exception], ...], pattern: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except exc as e:
        if not re.search(pattern, str(e)):
            raise AssertionError(f"expected /{pattern}/, got {type(e).__name__}: {e}") from None
        return
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"expected {exc} /{pattern}/, got {type(e).__name__}: {e}") from None
    raise AssertionError(f"expected {exc} /{pattern}/, nothing raised")


def C():
    return _ext.cpp()


def on(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with omniops.use_backend(backend):
            return fn()

    return run


VE, TE, ANY = ValueError, TypeError, (ValueError, TypeError)


# ---- 1. SIGABRT: routing scratch past the 192 KiB UB --------------------------------------------------------------
@regression
def route_16384_groups_of_one_expert() -> None:
    raises(VE, "num_groups", on("cpu", lambda: omniops.moe_route(torch.randn(1, 16384), 1, num_groups=16384,
                                                                 topk_groups=1)))


@regression
def route_14336_groups_sigmoid() -> None:
    raises(VE, "num_groups", on("cpu", lambda: omniops.moe_route(torch.randn(1, 14336), 1, scoring="sigmoid",
                                                                 num_groups=14336, topk_groups=1)))


@regression
def route_groups_direct_c() -> None:
    w, ids = torch.empty(1, 1), torch.empty(1, 1, dtype=I32)
    raises(VE, "num_groups", lambda: C().moe_route(w, ids, torch.randn(1, 16384), 1, "softmax", True, 16384, 1))


# ---- 2. SIGSEGV: n + block_size - 1 overflowing in the block-table check ------------------------------------------
def _huge_cache():
    return torch.zeros(1, 1, 1, 1).expand(1, 2**63 - 1, 1, 1)


# The public ops refuse a float32 cache claiming 2**63 - 1 slots up front (its bytes are past int64); the C++ entry
# points and the shared Python table check must still check every covered entry of such a table.
HUGE_OR_TABLE = r"block_table\[0, 0\]|k_cache: claims|kv_cache: claims"


@regression
def decode_huge_block_size_table_entry_past_num_blocks() -> None:
    kc = _huge_cache()
    lens = torch.tensor([5], dtype=I32)
    for entry in (2**31 - 1, -1):
        table = torch.tensor([[entry]], dtype=I32)
        for backend in ("cpu", "reference"):
            raises(VE, HUGE_OR_TABLE, on(backend, lambda t=table: omniops.gqa_decode(torch.randn(1, 1, 1), kc, kc, t,
                                                                                     lens)))
        raises(VE, r"block_table\[0, 0\]", lambda t=table: C().gqa_decode(
            torch.empty(1, 1, 1), torch.randn(1, 1, 1), kc, kc, t, lens, 1.0))
        raises(VE, r"block_table\[0, 0\]", lambda t=table: check_block_table(t, lens, "seq_lens", 1, 2**63 - 1))


@regression
def mla_decode_huge_block_size() -> None:
    kv = torch.zeros(1, 1, 1).expand(1, 2**63 - 1, 1)
    for backend in ("cpu", "reference"):
        raises(VE, HUGE_OR_TABLE, on(backend, lambda: omniops.mla_decode(
            torch.randn(1, 2, 1), kv, torch.tensor([[-1]], dtype=I32), torch.tensor([5], dtype=I32), v_dim=1)))
    raises(VE, r"block_table\[0, 0\]", lambda: C().mla_decode(torch.empty(1, 2, 1), torch.randn(1, 2, 1), kv,
                                                              torch.tensor([[-1]], dtype=I32),
                                                              torch.tensor([5], dtype=I32), 1.0, 1))


@regression
def prefill_paged_prefix_huge_block_size() -> None:
    kc = _huge_cache()
    q = torch.randn(2, 1, 1)
    cu = torch.tensor([0, 2], dtype=I32)
    for backend in ("cpu", "reference"):
        raises(VE, HUGE_OR_TABLE, on(backend, lambda: omniops.gqa_prefill(
            q, q, q, cu, k_cache=kc, v_cache=kc, block_table=torch.tensor([[2**31 - 1]], dtype=I32),
            context_lens=torch.tensor([5], dtype=I32))))
    raises(VE, r"block_table\[0, 0\]", lambda: C().gqa_prefill(torch.empty(2, 1, 1), q, q, q, cu, True, 1.0, kc, kc,
                                                               torch.tensor([[2**31 - 1]], dtype=I32),
                                                               torch.tensor([5], dtype=I32)))


# ---- 3. SIGSEGV: T*k + E*(bs-1) wrapping around in moe_dispatch ---------------------------------------------------
@regression
def dispatch_block_size_wrapping_rows() -> None:
    T, k, E, bs = 5, 2, 8, 2**61 + 1
    M = 10  # what T*k + E*(bs - 1) wraps to in int64
    outs = (torch.empty(M, 4), torch.empty(M, dtype=I32), torch.empty(E + 1, dtype=torch.int64),
            torch.empty(E, dtype=I32), torch.empty(T, k, dtype=I32))
    ids = torch.randint(0, E, (T, k), dtype=I32)
    raises(VE, "block_size", lambda: C().moe_dispatch(*outs, torch.randn(T, 4), ids, E, bs))


@regression
def dispatch_block_size_2_31_does_not_allocate() -> None:
    ids = torch.randint(0, 8, (5, 2), dtype=I32)
    for backend in ("cpu", "reference"):
        raises(VE, "block_size", on(backend, lambda: omniops.moe_dispatch(torch.randn(5, 4), ids, 8,
                                                                          block_size=2**31)))


# ---- outputs overlapping inputs -----------------------------------------------------------------------------------
@regression
def prefill_out_overlapping_cache_or_kv() -> None:
    q, k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=I32)
    kc = torch.randn(3, 4, 2, 8)
    table, ctx = torch.tensor([[0]], dtype=I32), torch.tensor([3], dtype=I32)
    raises(VE, "out .*overlap k_cache", lambda: C().gqa_prefill(kc[0], q, k, v, cu, True, 0.3, kc, kc.clone(), table,
                                                                 ctx))
    raises(VE, "out .*overlap k", lambda: C().gqa_prefill(k, q, k, v, cu, True, 0.3))
    raises(VE, "out .*overlap v", lambda: C().gqa_prefill(v, q, k, v, cu, True, 0.3))


@regression
def dense_out_aliasing_kv_mask_or_itself() -> None:
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    raises(VE, "out .*overlap k", lambda: C().dense_attention(k, q, k, v))
    raises(VE, "out .*overlap v", lambda: C().dense_attention(v, q, k, v))
    buf = torch.zeros(48)
    out, mask = buf.view(1, 2, 3, 8), buf[:18].view(1, 2, 3, 3)  # the mask [B, Hq, S, L] inside out
    raises(VE, "out .*overlap attn_mask", lambda: C().dense_attention(out, q, k, v, mask))
    rows = torch.empty(1, 2, 1, 8).expand(1, 2, 3, 8)
    raises(VE, "out: its elements overlap", lambda: C().dense_attention(rows, q, k, v))


@regression
def reshape_and_cache_shared_or_overlapping_caches() -> None:
    key, value = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    kc = torch.zeros(2, 2, 1, 4)
    slots = torch.tensor([0, 3])
    raises(VE, "k_cache must not overlap v_cache", lambda: C().reshape_and_cache(key, value, kc, kc, slots))
    for backend in ("cpu", "reference"):
        raises(VE, "k_cache must not overlap v_cache", on(backend, lambda: omniops.reshape_and_cache(
            key, value, kc, kc, slots)))
    buf = torch.zeros(16)
    raises(VE, "v_cache .*overlap value", lambda: C().reshape_and_cache(
        key, buf[:8].view(2, 1, 4), kc, buf.view(2, 2, 1, 4), slots))


@regression
def rms_norm_residual_out_is_out() -> None:
    x, r, w = torch.randn(2, 8), torch.randn(2, 8), torch.randn(8)
    o = torch.empty(2, 8)
    raises(VE, "out must not overlap residual_out", lambda: C().rms_norm(o, x, w, 1e-6, r, o))


@regression
def rotary_outputs_shared_or_swapped() -> None:
    pos, cache = torch.tensor([0, 1]), torch.randn(4, 8)
    q, k = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    o = torch.empty(2, 1, 8)
    raises(VE, "q_out must not overlap k_out", lambda: C().rotary_embedding(pos, q, k, cache, 8, True, o, o))
    raises(VE, "q_out must not overlap k", lambda: C().rotary_embedding(pos, q, k, cache, 8, True, k, q))


@regression
def decode_out_overlapping_cache_or_table() -> None:
    kc, vc = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
    q = torch.randn(1, 1, 8)
    table, lens = torch.tensor([[0, 1]], dtype=I32), torch.tensor([5], dtype=I32)
    raises(VE, "out .*overlap k_cache", lambda: C().gqa_decode(kc[0, :1], q, kc, vc, table, lens, 0.3))
    tbl = torch.zeros(8, dtype=I32)
    out_on_table = tbl.view(torch.float32).view(1, 1, 8)
    raises(VE, "out .*overlap block_table", lambda: C().gqa_decode(out_on_table, q, kc, vc, tbl[:2].view(1, 2), lens,
                                                                  0.3))
    kv = torch.randn(2, 4, 8)
    raises(VE, "out .*overlap kv_cache", lambda: C().mla_decode(kv[0, :1].view(1, 1, 8)[..., :4], torch.randn(1, 1, 8),
                                                               kv, table, lens, 0.3, 4))


# ---- sizes past the kernels' int32 index --------------------------------------------------------------------------
@regression
def dense_kv_len_2_31() -> None:
    L = 2**31
    q = torch.ones(1, 1, 1, 1)
    k = torch.ones(1, 1, 1, 1).expand(1, 1, L, 1)
    v = torch.full((1, 1, 1, 1), 2.0).expand(1, 1, L, 1)
    raises(VE, "kv_len", lambda: C().dense_attention(torch.empty(1, 1, 1, 1), q, k, v))
    raises(VE, "kv_len", on("cpu", lambda: omniops.gqa_attention(q, k, v)))


# ---- scalars ------------------------------------------------------------------------------------------------------
@regression
def scalars_finite_only_as_doubles() -> None:
    x, w = torch.randn(2, 8), torch.randn(8)
    for backend in ("cpu", "reference"):
        raises(VE, "eps", on(backend, lambda: omniops.rms_norm(x, w, 1e39)))
        raises(VE, "routed_scaling", on(backend, lambda: omniops.moe_route(torch.randn(2, 4), 2, routed_scaling=1e39)))
        raises(VE, "scale", on(backend, lambda: omniops.gqa_attention(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 2, 4),
                                                                      torch.randn(1, 1, 2, 4), scale=1e39)))
    raises(VE, "eps", lambda: C().rms_norm(torch.empty(2, 8), x, w, 1e39))
    kc = torch.randn(2, 4, 1, 8)
    args = (torch.empty(1, 1, 8), torch.randn(1, 1, 8), kc, kc, torch.tensor([[0]], dtype=I32),
            torch.tensor([3], dtype=I32))
    raises(VE, "scale", lambda: C().gqa_decode(*args, 1e39))
    raises(VE, "soft_cap", lambda: C().gqa_decode(*args, 0.3, 1e39))
    raises(VE, "routed_scaling", lambda: C().moe_route(torch.empty(2, 2), torch.empty(2, 2, dtype=I32),
                                                       torch.randn(2, 4), 2, "softmax", True, 0, 0, None, 1e39))


@regression
def ints_and_bools_taken_as_something_else() -> None:
    kc = torch.randn(2, 4, 1, 8)
    table, lens = torch.tensor([[0]], dtype=I32), torch.tensor([3], dtype=I32)
    q = torch.randn(1, 1, 8)
    for backend in ("cpu", "reference"):
        raises(TE, "window", on(backend, lambda: omniops.gqa_decode(q, kc, kc, table, lens, window=1.5)))
        raises(TE, "v_dim", on(backend, lambda: omniops.mla_decode(q, kc[:, :, 0], table, lens, v_dim=True)))
        raises(TE, "causal", on(backend, lambda: omniops.gqa_prefill(
            torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.tensor([0, 2], dtype=I32),
            causal=2)))
    raises(TE, "window", lambda: C().gqa_decode(torch.empty(1, 1, 8), q, kc, kc, table, lens, 0.3, 0.0, 1.5))
    raises(TE, "v_dim", lambda: C().mla_decode(torch.empty(1, 1, 1), q, kc[:, :, 0], table, lens, 0.3, True))
    t = torch.randn(2, 1, 8)
    raises(TE, "causal", lambda: C().gqa_prefill(torch.empty(2, 1, 8), t, t, t, torch.tensor([0, 2], dtype=I32), 2,
                                                 0.3))


@regression
def w4a16_zero_point_codes_above_15() -> None:
    x, w = torch.randn(2, 32), torch.randint(0, 256, (3, 16), dtype=torch.uint8)
    scales, zeros = torch.ones(3, 1), torch.full((3, 1), 16, dtype=torch.uint8)
    raises(VE, "zeros", lambda: C().w4a16_gemm(torch.empty(2, 3), x, w, scales, zeros, 32))
    for backend in ("cpu", "reference"):
        raises(VE, "zeros", on(backend, lambda: omniops.w4a16_gemm(x, w, scales, zeros, 32)))


# ---- messages -----------------------------------------------------------------------------------------------------
@regression
def python_types_named() -> None:
    x, w = torch.randn(2, 8), torch.randn(8)
    raises(TE, "^x: ", lambda: C().rms_norm(torch.empty(2, 8), None, w, 1e-6))
    raises(TE, "^weight: ", lambda: C().rms_norm(torch.empty(2, 8), x, [1.0] * 8, 1e-6))
    raises(VE, "^top_k: ", lambda: C().moe_route(torch.empty(2, 2), torch.empty(2, 2, dtype=I32), torch.randn(2, 4),
                                                 2**64, "softmax", True, 0, 0))


@regression
def dispatch_outputs_named() -> None:
    T, k, E = 3, 2, 4
    hidden, ids = torch.randn(T, 8), torch.randint(0, E, (T, k), dtype=I32)
    outs = [torch.empty(T * k, 8), torch.empty(T * k, dtype=I32), torch.empty(E + 1, dtype=torch.int64),
            torch.empty(E, dtype=I32), torch.empty(T, k, dtype=I32)]
    names = ["x_sorted", "sorted_token_ids", "expert_offsets", "expert_counts", "inverse_index"]
    for i, name in enumerate(names):
        bad = list(outs)
        bad[i] = bad[i].to("meta")
        raises(VE, f"^{name}: expected a CPU tensor", lambda b=bad: C().moe_dispatch(*b, hidden, ids, E))
    raises(VE, "num_experts", lambda: C().moe_dispatch(*outs, hidden, ids, 2**63 - 1))
    try:
        C().moe_dispatch(*outs, hidden, ids, 2**63 - 1)
    except ValueError as e:
        assert "-9223372036854775808" not in str(e), str(e)


@regression
def rotary_cache_none_named() -> None:
    q, k = torch.randn(2, 16), torch.randn(2, 16)
    for backend in ("cpu", "reference"):
        for fn in (omniops.rotary_embedding, omniops.rotary_embedding_):
            raises(TE, "cos_sin_cache", on(backend, lambda f=fn: f(torch.tensor([0, 1]), q, k, None, 16)))
