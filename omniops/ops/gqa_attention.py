"""Attention over contiguous K/V in SDPA's layout (HF's DynamicCache), GQA without repeating K/V.

Public API: ``gqa_attention``; custom op ``omni::gqa_attention``. The kernels are the paged ones of
``omniops/ops/attention.py`` over a "cache" of one block per sequence (no copy of the keys): cpu through
``omniops._C.dense_attention`` (``ascendc/bindings/attention.cpp``), triton in ``omniops/triton/gqa_attention.py``;
oracle ``omniops/reference/attention.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from omniops._family import OpFamily
from omniops._registry import call, omni_op
from omniops._validation import FLOAT_DTYPES, check_bool, check_tensor
from omniops.ops._attention_checks import (
    CPU_MAX_DECODE_DIM,
    CPU_MAX_PREFILL_DIM,
    check_dims,
    check_heads,
    check_keys_values,
    resolve_scale,
)
from omniops.ops._layout import inner_contiguous
from omniops.reference import attention as ref


def _gqa_attention_reference(out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, causal: bool,
                             scale: float) -> None:
    """The backends' form: q/k/v with unit inner strides, attn_mask None or [B|1, Hq|1, S|1, L] bool / fp32 with a
    unit key stride; out [B, Hq, S, Dv] (laid out [B, S, Hq, Dv])."""
    out.copy_(ref.gqa_attention(q, k, v, attn_mask, causal, scale))


def _cpu_reason(out: Tensor, q: Tensor, k: Tensor, v: Tensor, *_: object) -> str | None:
    limit = CPU_MAX_DECODE_DIM if q.shape[2] == 1 else CPU_MAX_PREFILL_DIM
    if max(q.shape[-1], v.shape[-1]) > limit:
        return f"head dims above {limit} are not supported by the cpu kernels"
    return None


GQA_ATTENTION = OpFamily("gqa_attention", _gqa_attention_reference, cpu="dense_attention",
                         supports={"cpu": _cpu_reason})


def _mask_shape(attn_mask: Tensor, B: int, hq: int, S: int, L: int) -> tuple[int, ...]:
    """attn_mask's shape padded to 4 dims, after checking it broadcasts to [B, Hq, S, L]."""
    if attn_mask.dim() > 4 or attn_mask.dim() < 1:
        raise ValueError(f"attn_mask: expected 1-4 dims broadcastable to [{B}, {hq}, {S}, {L}], got "
                         f"{list(attn_mask.shape)}")
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    for i, (n, want, what) in enumerate(zip(shape, (B, hq, S, L), ("batch", "q_heads", "q_len", "kv_len"),
                                            strict=True)):
        if n not in (1, want):
            raise ValueError(f"attn_mask: dim {i} ({what}) must be 1 or {want}, got shape {list(attn_mask.shape)}")
    return shape


def _mask_4d(attn_mask: Tensor, B: int, hq: int, S: int, L: int) -> Tensor:
    """attn_mask as a [B|1, Hq|1, S|1, L] view with a unit key stride (a broadcast key dim is materialised)."""
    m = attn_mask.reshape(_mask_shape(attn_mask, B, hq, S, L))
    if m.shape[3] != L or (L > 1 and m.stride(3) != 1):
        m = m.expand(m.shape[0], m.shape[1], m.shape[2], L).contiguous()
    return m


def _validate_gqa_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, causal: bool) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=4)
    check_keys_values("k", k, "v", v, 4, q)
    B, hq, S, d = q.shape
    hk, L = k.shape[1], k.shape[2]
    check_dims("k", k, (B, None, None, d), "batch of q, kv_heads, kv_len, head_dim of q")
    check_dims("v", v, (B, hk, L, None), "batch, kv_heads, kv_len as k")
    check_heads(hq, hk, "k dim 1", d, v.shape[-1])
    if S > L:
        raise ValueError(f"q: query length {S} (dim 2) exceeds the key length {L} (k dim 2); the keys include the "
                         "queries' own positions (KV-cache attention)")
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask)
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask: expected bool (True = attend) or a float dtype (added), got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask: expected device {q.device} (as q), got {attn_mask.device}")
        _mask_shape(attn_mask, B, hq, S, L)


def _attention_out(q: Tensor, v: Tensor) -> Tensor:
    # [B, Hq, S, Dv] laid out as [B, S, Hq, Dv]: what SDPA callers transpose(1, 2) to next, so that is free.
    B, hq, S, _ = q.shape
    return q.new_empty(B, S, hq, v.shape[-1]).transpose(1, 2)


def _fake_gqa_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, causal: bool,
                        scale: float) -> Tensor:
    _validate_gqa_attention(q, k, v, attn_mask, causal)
    return _attention_out(q, v)


@omni_op("gqa_attention", fake=_fake_gqa_attention)
def _gqa_attention_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, causal: bool,
                      scale: float) -> Tensor:
    out = _fake_gqa_attention(q, k, v, attn_mask, causal, scale)
    if out.numel() == 0:
        return out
    if k.shape[2] == 0:
        return out.zero_()
    B, hq, S, _ = q.shape
    mask = None
    if attn_mask is not None:
        mask = _mask_4d(attn_mask, B, hq, S, k.shape[2])
        if mask.dtype != torch.bool and mask.dtype != torch.float32:
            mask = mask.float()  # the kernels add fp32 (the reference computes the scores in fp32 anyway)
    args = (out, inner_contiguous(q), inner_contiguous(k), inner_contiguous(v), mask, causal, scale)
    GQA_ATTENTION.select(q.device, q.dtype, *args)(*args)
    return out


def gqa_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *, causal: bool = False,
                  scale: float | None = None) -> Tensor:
    """Attention over contiguous K/V in SDPA's layout (HF's DynamicCache), GQA without repeating K/V.

    Args:
        q: ``[B, Hq, S, D]``; k: ``[B, Hk, L, D]``; v: ``[B, Hk, L, Dv]`` with ``Hq % Hk == 0`` and ``S <= L``
            (the keys include the queries' positions, as in a KV cache). Any strides with a unit inner one.
        attn_mask: broadcastable to ``[B, Hq, S, L]``: bool (True = attend) or float (added to the scaled scores),
            as ``torch.nn.functional.scaled_dot_product_attention`` takes it.
        causal: bottom-right aligned (FlashAttention-2's convention): query s sees keys ``<= L - S + s``; the
            same as SDPA's ``is_causal`` when ``S == L``.
        scale: default ``1 / sqrt(D)``.

    Returns ``[B, Hq, S, Dv]`` (memory laid out as ``[B, S, Hq, Dv]``). A row that sees no key gives zeros
    (SDPA: NaN). Backends: cpu and triton run their paged kernels over one block per sequence (triton: no
    ``attn_mask``), reference.

    Example::

        out = omniops.gqa_attention(q, k_cache, v_cache, causal=True)  # q [2, 8, 5, 64], k/v [2, 2, 37, 64]
    """
    return call(_gqa_attention_op, q, k, v, attn_mask, check_bool("causal", causal), resolve_scale(scale, q))
