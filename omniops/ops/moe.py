"""Mixture-of-Experts: routing, dispatch, grouped expert GEMM, combine, and the fused block.

Public API: ``moe_route``, ``moe_dispatch``, ``grouped_gemm``, ``moe_combine``, ``fused_moe``.
Custom ops: ``omni::moe_route``, ``omni::moe_dispatch``, ``omni::grouped_gemm``, ``omni::moe_combine``,
``omni::fused_moe``. Kernels: ``ascendc/kernels/moe/`` (cpu), ``omniops/triton/moe.py``; oracle
``omniops/reference/moe.py`` (its docstring states the numerics every backend follows).

Layouts follow vLLM / HF checkpoints: ``w13 [E, 2*I, H]`` (gate rows then up rows, i.e. ``cat(w1, w3)``),
``w2 [E, H, I]``, both row-major ``[N, K]`` so a dot over K is contiguous. Routing returns fp32 weights and
int32 ids ``[T, k]``; ids may also be int64 everywhere they are consumed. Quantized experts run as quantized
GEMMs (``omniops/ops/quant_gemm.py``) between ``moe_dispatch`` and ``moe_combine``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from omniops import _ext
from omniops._family import OpFamily
from omniops._registry import call, fast_cpu, omni_op
from omniops._validation import (
    FLOAT_DTYPES,
    check_bool,
    check_float,
    check_int,
    check_int32_size,
    check_same,
    check_shape,
    check_tensor,
    check_values,
)
from omniops.ops._layout import as_int32, as_rows
from omniops.ops.prepack import linear_tiles, moe_tiles
from omniops.reference import moe as ref

INDEX_DTYPES = (torch.int32, torch.int64)
ACTIVATIONS = ("silu",)
SCORINGS = ("softmax", "sigmoid")


class MoEDispatch(NamedTuple):
    """Result of ``moe_dispatch``: pairs (token, slot) grouped by expert, stable in pair order t*k + j.

    ``x_sorted [M, H]``: the hidden rows in expert order (padding rows are 0); ``sorted_token_ids int32 [M]``:
    the token of every row (-1 on padding); ``expert_offsets int64 [E+1]``: expert e owns rows
    ``[offsets[e], offsets[e+1])``; ``expert_counts int32 [E]``: tokens per expert (unpadded; what a load
    balancer records); ``inverse_index int32 [T, k]``: the row of pair (t, j).
    """

    x_sorted: Tensor
    sorted_token_ids: Tensor
    expert_offsets: Tensor
    expert_counts: Tensor
    inverse_index: Tensor


# ---- moe_route -------------------------------------------------------------------------------------------------
def _moe_route_reference(topk_weights: Tensor, topk_ids: Tensor, router_logits: Tensor, top_k: int, scoring: str,
                         renormalize: bool, num_groups: int | None, topk_groups: int | None,
                         correction_bias: Tensor | None, routed_scaling: float) -> None:
    """The backends' form: logits [T, E] with unit inner stride, correction_bias fp32 contiguous."""
    w, ids = ref.moe_route(router_logits, top_k, scoring=scoring, renormalize=renormalize, num_groups=num_groups,
                           topk_groups=topk_groups, correction_bias=correction_bias, routed_scaling=routed_scaling)
    topk_weights.copy_(w)
    topk_ids.copy_(ids)


# The C ABI spells "no groups" 0 and its binding declares no default for it.
MOE_ROUTE = OpFamily("moe_route", _moe_route_reference, cpu_none={"num_groups": 0, "topk_groups": 0})


def _validate_route(logits: Tensor, top_k: int, scoring: str, renormalize: bool, num_groups: int | None,
                    topk_groups: int | None, bias: Tensor | None, scaling: float) -> None:
    check_tensor("router_logits", logits, dtypes=FLOAT_DTYPES, dim=2)
    E = logits.shape[1]
    if E < 1:
        raise ValueError(f"router_logits: expected at least one expert column, got shape {list(logits.shape)}")
    if E > 16384:
        raise ValueError(f"router_logits: at most 16384 experts are supported, got {E}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= E:
        raise ValueError(f"top_k: expected an int in [1, {E}] (the number of experts), got {top_k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    check_bool("renormalize", renormalize)
    if num_groups is not None and check_int("num_groups", num_groups):
        if num_groups < 1 or E % num_groups:
            raise ValueError(
                f"num_groups: expected a positive divisor of the number of experts {E}, got {num_groups!r}")
        if topk_groups is None or not 1 <= check_int("topk_groups", topk_groups) <= num_groups:
            raise ValueError(f"topk_groups: expected an int in [1, num_groups={num_groups}], got {topk_groups!r}")
        if top_k > topk_groups * (E // num_groups):
            raise ValueError(f"top_k: {top_k} exceeds the {topk_groups * (E // num_groups)} experts left in "
                             f"topk_groups={topk_groups} groups of {E // num_groups}")
    elif topk_groups is not None and check_int("topk_groups", topk_groups):
        raise ValueError("topk_groups: given without num_groups")
    if bias is not None:
        check_tensor("correction_bias", bias, dtypes=FLOAT_DTYPES, dim=1)
        check_same("correction_bias", bias, "router_logits", logits, dtype=False)
        check_shape("correction_bias", bias, (E,), "one per expert")
    check_float("routed_scaling", scaling)  # finite in fp32 (the kernels' type)


def _fake_route(logits: Tensor, top_k: int, scoring: str, renormalize: bool, num_groups: int | None,
                topk_groups: int | None, correction_bias: Tensor | None, routed_scaling: float
                ) -> tuple[Tensor, Tensor]:
    _validate_route(logits, top_k, scoring, renormalize, num_groups, topk_groups, correction_bias, routed_scaling)
    T = logits.shape[0]
    return (logits.new_empty(T, top_k, dtype=torch.float32), logits.new_empty(T, top_k, dtype=torch.int32))


@omni_op("moe_route", fake=_fake_route)
def _moe_route_op(logits: Tensor, top_k: int, scoring: str, renormalize: bool, num_groups: int | None,
                  topk_groups: int | None, correction_bias: Tensor | None, routed_scaling: float
                  ) -> tuple[Tensor, Tensor]:
    w, ids = _fake_route(logits, top_k, scoring, renormalize, num_groups, topk_groups, correction_bias,
                         routed_scaling)
    if logits.shape[0]:
        bias = None if correction_bias is None else correction_bias.float().contiguous()
        MOE_ROUTE.select(logits.device, logits.dtype)(
            w, ids, as_rows(logits), top_k, scoring, renormalize, num_groups, topk_groups, bias, float(routed_scaling))
    return w, ids


def moe_route(
    router_logits: Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    correction_bias: Tensor | None = None,
    routed_scaling: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Pick ``top_k`` experts per token. Returns ``(topk_weights fp32 [T, k], topk_ids int32 [T, k])``,
    sorted by descending selection score.

    * Mixtral / Qwen3-MoE: ``scoring="softmax"``, ``renormalize=True`` (Qwen3's ``norm_topk_prob``).
    * DeepSeek-V3: ``scoring="sigmoid"``, ``correction_bias=e_score_correction_bias`` (added for the choice
      only), ``num_groups=n_group``, ``topk_groups=topk_group`` (a group scores the sum of its two best
      biased scores; without a bias its best, as DeepSeek-V2), ``renormalize=norm_topk_prob``,
      ``routed_scaling=routed_scaling_factor``. Weights come from the unbiased scores.
    """
    C = fast_cpu(router_logits, correction_bias)
    if (C is not None and isinstance(router_logits, Tensor) and router_logits.dim() == 2 and router_logits.shape[0] > 0
            and type(top_k) is int and type(scoring) is str and type(renormalize) is bool
            and (num_groups is None) == (topk_groups is None)
            and all(g is None or type(g) is int for g in (num_groups, topk_groups))
            and (correction_bias is None or (isinstance(correction_bias, Tensor)
                                             and correction_bias.dtype == torch.float32))
            and type(routed_scaling) is float and abs(routed_scaling) < 3.0e38):  # finite in fp32, not NaN
        # The common eager call (every MoE layer, every step): straight to C++, which checks the rest itself.
        try:
            T = router_logits.shape[0]
            w = router_logits.new_empty(T, top_k, dtype=torch.float32)
            ids = router_logits.new_empty(T, top_k, dtype=torch.int32)
            MOE_ROUTE.cpu_impl()(w, ids, router_logits, top_k, scoring, renormalize, num_groups, topk_groups,
                                 correction_bias, float(routed_scaling))
            return w, ids
        except (ValueError, TypeError, RuntimeError):
            pass  # the checked path below raises the error of this input
    return call(_moe_route_op, router_logits, top_k, scoring, renormalize, num_groups, topk_groups, correction_bias,
                check_float("routed_scaling", routed_scaling))


# ---- moe_dispatch ----------------------------------------------------------------------------------------------
def _moe_dispatch_reference(x_sorted: Tensor, sorted_token_ids: Tensor, expert_offsets: Tensor,
                            expert_counts: Tensor, inverse_index: Tensor, hidden: Tensor, topk_ids: Tensor,
                            num_experts: int, block_size: int | None) -> None:
    """The backends' form: the five outputs of ``MoEDispatch``, then hidden [T, H] and int32 topk_ids."""
    r = ref.moe_dispatch(hidden, topk_ids, num_experts, block_size)
    for dst, src in zip((x_sorted, sorted_token_ids, expert_offsets, expert_counts, inverse_index), r, strict=True):
        dst.copy_(src)


MOE_DISPATCH = OpFamily("moe_dispatch", _moe_dispatch_reference)


def _validate_dispatch(hidden: Tensor, topk_ids: Tensor, num_experts: int, block_size: int | None) -> None:
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("topk_ids", topk_ids, dtypes=INDEX_DTYPES, dim=2)
    check_same("topk_ids", topk_ids, "hidden", hidden, dtype=False)
    if topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"topk_ids: expected {hidden.shape[0]} rows (tokens of hidden), got {list(topk_ids.shape)}")
    check_int("num_experts", num_experts, lo=1)
    if block_size is not None:
        check_int("block_size", block_size, lo=1)
    # sorted_token_ids / inverse_index are int32 (every backend): rows and pairs must fit
    T, k = topk_ids.shape
    check_int32_size("topk_ids", T * k, "tokens * top_k")
    check_int32_size("block_size", T * k + num_experts * ((block_size or 1) - 1),
                     "rows tokens*top_k + num_experts*(block_size - 1)")


def _fake_dispatch(hidden: Tensor, topk_ids: Tensor, num_experts: int, block_size: int | None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _validate_dispatch(hidden, topk_ids, num_experts, block_size)
    T, k = topk_ids.shape
    M = T * k + num_experts * ((block_size or 1) - 1)
    return (hidden.new_empty(M, hidden.shape[1]), hidden.new_empty(M, dtype=torch.int32),
            hidden.new_empty(num_experts + 1, dtype=torch.int64), hidden.new_empty(num_experts, dtype=torch.int32),
            hidden.new_empty(T, k, dtype=torch.int32))


@omni_op("moe_dispatch", fake=_fake_dispatch)
def _moe_dispatch_op(hidden: Tensor, topk_ids: Tensor, num_experts: int, block_size: int | None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    outs = _fake_dispatch(hidden, topk_ids, num_experts, block_size)
    impl = MOE_DISPATCH.select(hidden.device, hidden.dtype)
    if impl is not MOE_DISPATCH.cpu_impl():  # the C++ entry point checks the values itself
        check_values("topk_ids", topk_ids, 0, num_experts)
    impl(*outs, as_rows(hidden), as_int32(topk_ids), num_experts, block_size)
    return outs


def moe_dispatch(hidden: Tensor, topk_ids: Tensor, num_experts: int, *, block_size: int | None = None) -> MoEDispatch:
    """Group the T*k (token, slot) pairs by expert (a stable counting sort) and gather their hidden rows.

    ``hidden [T, H]``, ``topk_ids [T, k]`` in ``[0, num_experts)``. With ``block_size`` every expert's segment
    is padded to a multiple of it (for tiled GEMMs) and M = T*k + E*(block_size-1) rows are returned, the tail
    past ``expert_offsets[E]`` being padding too. See ``MoEDispatch`` for the fields.
    """
    return MoEDispatch(*call(_moe_dispatch_op, hidden, topk_ids, num_experts, block_size))


# ---- grouped_gemm ----------------------------------------------------------------------------------------------
def _grouped_gemm_reference(out: Tensor, x_sorted: Tensor, w: Tensor, expert_offsets: Tensor) -> None:
    """The backends' form: x_sorted [M, K] with unit inner stride, w contiguous, int64 offsets."""
    out.copy_(ref.grouped_gemm(x_sorted, w, expert_offsets))


GROUPED_GEMM = OpFamily("grouped_gemm", _grouped_gemm_reference)


@GROUPED_GEMM.impl("cpu")
def _grouped_gemm_cpu(out: Tensor, x_sorted: Tensor, w: Tensor, expert_offsets: Tensor) -> None:
    # bf16 on the amx library: the weight's cached tile copy (packed on first use)
    _ext.cpp().grouped_gemm(out, x_sorted, w, expert_offsets, linear_tiles(w))


def _validate_gemm(x: Tensor, w: Tensor, offsets: Tensor) -> None:
    check_tensor("x_sorted", x, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("w", w, dim=3)
    check_same("w", w, "x_sorted", x)
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"w: expected shape [experts, N, {x.shape[1]}] (K = x_sorted's columns), got {list(w.shape)}")
    if w.shape[0] < 1:
        raise ValueError("w: expected at least one expert")
    check_tensor("expert_offsets", offsets, dtypes=INDEX_DTYPES, dim=1)
    check_same("expert_offsets", offsets, "x_sorted", x, dtype=False)
    check_shape("expert_offsets", offsets, (w.shape[0] + 1,), "experts + 1")


def _check_offset_values(x: Tensor, offsets: Tensor) -> None:
    o = offsets.long()
    if int(o[0]) < 0 or int(o[-1]) > x.shape[0] or bool((o[1:] < o[:-1]).any()):
        raise ValueError(f"expert_offsets: must be non-decreasing within [0, {x.shape[0]}] (rows of x_sorted)")


def _fake_gemm(x_sorted: Tensor, w: Tensor, expert_offsets: Tensor) -> Tensor:
    _validate_gemm(x_sorted, w, expert_offsets)
    return x_sorted.new_empty(x_sorted.shape[0], w.shape[1])


@omni_op("grouped_gemm", fake=_fake_gemm)
def _grouped_gemm_op(x_sorted: Tensor, w: Tensor, expert_offsets: Tensor) -> Tensor:
    out = _fake_gemm(x_sorted, w, expert_offsets)
    impl = GROUPED_GEMM.select(x_sorted.device, x_sorted.dtype)
    # The C++ entry point checks the offset values itself (one pass in C++, no tensor ops): the ~20 us of torch
    # ops below would double a decode-sized call (the linear pass calls this once per linear and step).
    if impl is not _grouped_gemm_cpu:
        _check_offset_values(x_sorted, expert_offsets)
    if out.numel():
        offs = expert_offsets if expert_offsets.dtype == torch.int64 else expert_offsets.to(torch.int64)
        impl(out, as_rows(x_sorted), w.contiguous(), offs.contiguous())
    return out


def grouped_gemm(x_sorted: Tensor, w: Tensor, expert_offsets: Tensor) -> Tensor:
    """``out[r] = x_sorted[r] @ w[e].T`` for the rows ``[offsets[e], offsets[e+1])`` of each expert e; rows of
    no expert are 0. ``x_sorted [M, K]``, ``w [E, N, K]``, ``expert_offsets [E+1]`` (int32/int64). fp32
    accumulation, one rounding."""
    C = fast_cpu(x_sorted, w, expert_offsets)
    if (C is not None and isinstance(x_sorted, Tensor) and isinstance(w, Tensor) and isinstance(expert_offsets, Tensor)
            and expert_offsets.dtype == torch.int64 and x_sorted.dim() == 2 and w.dim() == 3
            and x_sorted.shape[0] > 0 and w.shape[1] > 0):
        # The common eager call (every serving linear, every step): straight to C++, which checks everything.
        try:
            out = x_sorted.new_empty(x_sorted.shape[0], w.shape[1])
            C.grouped_gemm(out, x_sorted, w, expert_offsets, linear_tiles(w))
            return out
        except (ValueError, TypeError, RuntimeError):
            pass  # the checked path below raises the error of this input (or copies a layout C++ refuses)
    return call(_grouped_gemm_op, x_sorted, w, expert_offsets)


# ---- moe_combine -----------------------------------------------------------------------------------------------
def _moe_combine_reference(out: Tensor, expert_out: Tensor, topk_weights: Tensor, inverse_index: Tensor) -> None:
    """The backends' form: expert_out rows with unit inner stride, fp32 weights, int32 inverse_index."""
    out.copy_(ref.moe_combine(expert_out, topk_weights, inverse_index))


MOE_COMBINE = OpFamily("moe_combine", _moe_combine_reference)


def _validate_combine(y: Tensor, w: Tensor, inv: Tensor) -> None:
    check_tensor("expert_out", y, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("topk_weights", w, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("inverse_index", inv, dtypes=INDEX_DTYPES, dim=2)
    check_same("topk_weights", w, "expert_out", y, dtype=False)
    check_same("inverse_index", inv, "expert_out", y, dtype=False)
    check_shape("topk_weights", w, tuple(inv.shape), "as inverse_index")


def _fake_combine(expert_out: Tensor, topk_weights: Tensor, inverse_index: Tensor) -> Tensor:
    _validate_combine(expert_out, topk_weights, inverse_index)
    return expert_out.new_empty(inverse_index.shape[0], expert_out.shape[1])


@omni_op("moe_combine", fake=_fake_combine)
def _moe_combine_op(expert_out: Tensor, topk_weights: Tensor, inverse_index: Tensor) -> Tensor:
    out = _fake_combine(expert_out, topk_weights, inverse_index)
    impl = MOE_COMBINE.select(expert_out.device, expert_out.dtype)
    if impl is not MOE_COMBINE.cpu_impl() or not out.numel():  # else the C++ entry point checks the values
        check_values("inverse_index", inverse_index, -1, expert_out.shape[0])
    if out.numel():
        impl(out, as_rows(expert_out), topk_weights.float().contiguous(), as_int32(inverse_index))
    return out


def moe_combine(expert_out: Tensor, topk_weights: Tensor, inverse_index: Tensor) -> Tensor:
    """``out[t] = sum_j topk_weights[t, j] * expert_out[inverse_index[t, j]]`` (fp32 sum, one rounding to
    expert_out's dtype); an index of -1 contributes nothing (an expert on another rank)."""
    return call(_moe_combine_op, expert_out, topk_weights, inverse_index)


# ---- fused_moe -------------------------------------------------------------------------------------------------
def _fused_moe_reference(out: Tensor, hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor,
                         topk_ids: Tensor, activation: str, expert_map: Tensor | None) -> None:
    """The backends' form: contiguous weights, fp32 topk_weights, int32 topk_ids and expert_map."""
    out.copy_(ref.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation, expert_map))


FUSED_MOE = OpFamily("fused_moe", _fused_moe_reference)


@FUSED_MOE.impl("cpu")
def _fused_moe_cpu(out: Tensor, hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                   activation: str, expert_map: Tensor | None) -> None:
    # bf16 on the amx library: AMX tiles on the weights' cached tile copies (packed on first use)
    tiles = moe_tiles(w13, w2) or (None, None)
    _ext.cpp().fused_moe(out, hidden, w13, w2, topk_weights, topk_ids, activation, expert_map, *tiles)


def _validate_fused(hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                    activation: str, expert_map: Tensor | None) -> int:
    """Metadata checks; returns the number of global experts (the range of topk_ids)."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, dim=2)
    T, H = hidden.shape
    if H < 1:
        raise ValueError(f"hidden: the hidden size must be >= 1, got shape {list(hidden.shape)}")
    check_tensor("w13", w13, dim=3)
    check_same("w13", w13, "hidden", hidden)
    if w13.shape[1] < 2 or w13.shape[1] % 2 or w13.shape[2] != H:
        raise ValueError(f"w13: expected shape [experts, 2*intermediate, {H}] (gate and up rows; H from hidden), "
                         f"got {list(w13.shape)}")
    E, inter = w13.shape[0], w13.shape[1] // 2
    if E < 1:
        raise ValueError("w13: expected at least one expert")
    check_tensor("w2", w2, dim=3)
    check_same("w2", w2, "hidden", hidden)
    check_shape("w2", w2, (E, H, inter), "[experts, hidden, intermediate] from w13 and hidden")
    check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("topk_ids", topk_ids, dtypes=INDEX_DTYPES, dim=2)
    check_same("topk_weights", topk_weights, "hidden", hidden, dtype=False)
    check_same("topk_ids", topk_ids, "hidden", hidden, dtype=False)
    if topk_ids.shape[0] != T or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids: expected shape [{T}, top_k >= 1] (tokens of hidden), got {list(topk_ids.shape)}")
    check_shape("topk_weights", topk_weights, tuple(topk_ids.shape), "as topk_ids")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    n_global = E
    if expert_map is not None:
        check_tensor("expert_map", expert_map, dtypes=INDEX_DTYPES, dim=1)
        check_same("expert_map", expert_map, "hidden", hidden, dtype=False)
        if expert_map.shape[0] < 1:
            raise ValueError("expert_map: expected one entry per global expert, got an empty tensor")
        n_global = expert_map.shape[0]
    return n_global


def _fake_fused(hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor, activation: str,
                expert_map: Tensor | None) -> Tensor:
    _validate_fused(hidden, w13, w2, topk_weights, topk_ids, activation, expert_map)
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


@omni_op("fused_moe", fake=_fake_fused)
def _fused_moe_op(hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor, activation: str,
                  expert_map: Tensor | None) -> Tensor:
    n_global = _validate_fused(hidden, w13, w2, topk_weights, topk_ids, activation, expert_map)
    out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    impl = FUSED_MOE.select(hidden.device, hidden.dtype)
    if impl is not FUSED_MOE.cpu_impl():  # the C++ entry point checks the values itself
        if expert_map is not None:
            check_values("expert_map", expert_map, -1, w13.shape[0])
        check_values("topk_ids", topk_ids, 0, n_global)
    if hidden.shape[0]:
        impl(out, as_rows(hidden), w13.contiguous(), w2.contiguous(), topk_weights.float().contiguous(),
             as_int32(topk_ids), activation, None if expert_map is None else as_int32(expert_map))
    return out


def fused_moe(
    hidden: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    *,
    activation: str = "silu",
    expert_map: Tensor | None = None,
) -> Tensor:
    """The MoE block: ``out[t] = sum_j topk_weights[t, j] * W2[e] @ (silu(G[e] x_t) * (U[e] x_t))`` with
    ``e = expert_map[topk_ids[t, j]]``.

    Args:
        hidden: ``[T, H]`` float32/float16/bfloat16 (any row stride); T = 0 gives an empty result.
        w13: ``[E, 2*I, H]`` gate rows then up rows, same dtype as hidden. w2: ``[E, H, I]``.
        topk_weights: ``[T, k]`` any float dtype (used in fp32). topk_ids: ``[T, k]`` int32/int64.
        activation: ``"silu"`` (SwiGLU).
        expert_map: optional ``[E_global]`` int32/int64 mapping global expert ids (the values of topk_ids) to
            local ones in ``[0, E)``, or -1 for experts on other ranks, which then contribute 0.
    Never materialises a dense ``[T, E, ...]`` tensor; each hit expert's weights are read once per 48 tokens.
    bf16 on the ``amx`` kernel library: AMX tiles on prepacked weights (``prepack_moe_weights``; packed and
    cached on first use otherwise).
    """
    C = fast_cpu(hidden, w13, w2, topk_weights, topk_ids, expert_map)
    if (C is not None and all(isinstance(t, Tensor) for t in (hidden, w13, w2, topk_weights, topk_ids))
            and topk_weights.dtype == torch.float32 and topk_ids.dtype == torch.int32
            and (expert_map is None or expert_map.dtype == torch.int32)):
        # The common eager call: straight to C++, which checks everything (see _registry.fast_cpu).
        try:
            out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
            _fused_moe_cpu(out, hidden, w13, w2, topk_weights, topk_ids, activation, expert_map)
            return out
        except (ValueError, TypeError, RuntimeError):
            pass  # the checked path below raises the error of this input (RuntimeError: an impossible output size)
    return call(_fused_moe_op, hidden, w13, w2, topk_weights, topk_ids, activation, expert_map)
