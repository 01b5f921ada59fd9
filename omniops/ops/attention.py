"""Attention over a paged KV cache: GQA and weight-absorbed MLA, decode and varlen prefill, cache writes.

Public API: ``reshape_and_cache``, ``gqa_decode``, ``gqa_prefill``, ``mla_cache``, ``mla_decode``, and
``gqa_attention`` over contiguous K/V (SDPA / HF DynamicCache layout). Custom ops: ``omni::<name>`` for each.
Kernels: ``ascendc/kernels/attention/`` (cpu), ``omniops/triton/attention.py``;
oracle ``omniops/reference/attention.py``.

Cache layouts (vLLM's): ``k_cache/v_cache [num_blocks, block_size, kv_heads, head_dim]``, MLA
``kv_cache [num_blocks, block_size, kv_lora_rank + rope_dim]`` (576 = 512 + 64 for DeepSeek-V2/V3). Token ``i``
of sequence ``b`` is at block ``block_table[b, i // block_size]``, offset ``i % block_size``
(``slot = block * block_size + offset``). Only the ``ceil(seq_len / block_size)`` table entries a sequence's
length covers are read (and checked); a sequence of length 0 gives zeros.

Input checks: shapes/dtypes/devices (metadata, free) always; index values (``validate=True``, the default) cost
one pass over ``block_table``/``seq_lens`` (or ``slot_mapping``, ``cu_seqlens``) with torch ops plus one
host-device sync on GPU. Callers that build their tables themselves can pass ``validate=False``; the C++ entry
points in ``omniops._C`` re-check the values anyway (they are reachable directly), Triton kernels do not.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from omniops import _ext
from omniops._backends import OpFamily
from omniops._registry import call, omni_op
from omniops._validation import FLOAT_DTYPES, check_same, check_tensor, is_fake
from omniops.reference import attention as ref

CPU_MAX_DECODE_DIM = 768  # OMNI_ATTN_MAX_DECODE_DIM in ascendc/include/omni/ops/attention.h
CPU_MAX_PREFILL_DIM = 256  # OMNI_ATTN_MAX_PREFILL_DIM


class ArgumentError(ValueError, TypeError):
    """A mismatched dtype: a ValueError as the attention contract says, and a TypeError as other ops raise."""


def _same(name: str, t: Tensor, ref_name: str, r: Tensor) -> None:
    try:
        check_same(name, t, ref_name, r)
    except TypeError as e:
        raise ArgumentError(str(e)) from None


def _dims(name: str, t: Tensor, expected: tuple[int | None, ...], what: str) -> None:
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected, strict=False)):
        shape = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name}: expected shape [{shape}] ({what}), got {list(t.shape)}")


def _scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number or None, got {scale!r}")
    return float(scale)


def _inner_contig(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# ---- value checks (skipped on fake tensors and with validate=False) ----------------------------------------
def _check_table_values(block_table: Tensor, lens: Tensor, lens_name: str, num_blocks: int, block_size: int) -> None:
    """lens in [0, max_blocks * block_size]; covered table entries in [0, num_blocks). One sync."""
    if lens.numel() == 0 or is_fake(lens) or is_fake(block_table):
        return
    max_blocks = block_table.shape[1]
    cap = max_blocks * block_size
    ln = lens.long()
    covered = torch.arange(max_blocks, device=lens.device)[None, :] < ((ln + block_size - 1) // block_size)[:, None]
    bad = covered & ((block_table < 0) | (block_table >= num_blocks))
    lo, hi, nbad = torch.stack((ln.min(), ln.max(), bad.sum())).tolist()
    if lo < 0 or hi > cap:
        i = int(((ln < 0) | (ln > cap)).nonzero()[0, 0])
        raise ValueError(f"{lens_name}[{i}] = {int(ln[i])} is outside [0, {cap}] (block_table covers {max_blocks} "
                         f"blocks of {block_size} tokens)")
    if nbad:
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is outside [0, {num_blocks}) "
                         f"(num_blocks of the cache)")


def _check_slot_values(slot_mapping: Tensor, num_slots: int) -> None:
    if slot_mapping.numel() == 0 or is_fake(slot_mapping):
        return
    lo, hi = torch.stack((slot_mapping.min(), slot_mapping.max())).tolist()
    if lo < -1 or hi >= num_slots:
        i = int(((slot_mapping < -1) | (slot_mapping >= num_slots)).nonzero()[0, 0])
        raise ValueError(f"slot_mapping[{i}] = {int(slot_mapping[i])} is outside [-1, {num_slots}) "
                         "(-1 = skip; num_blocks * block_size slots)")


def _check_cu_values(cu_seqlens: Tensor, tokens: int) -> None:
    if is_fake(cu_seqlens):
        return
    first, last, dec = torch.stack((cu_seqlens[0].long(), cu_seqlens[-1].long(),
                                    (cu_seqlens.diff() < 0).sum())).tolist()
    if first != 0 or last != tokens or dec:
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to the token count {tokens}, "
                         f"got {cu_seqlens.tolist()}")


def _check_index(name: str, t: Tensor, dim: int, dtypes=(torch.int32,)) -> None:
    check_tensor(name, t, dtypes=dtypes, dim=dim)


def _check_decode_tables(q: Tensor, block_table: Tensor, seq_lens: Tensor, num_blocks: int, block_size: int) -> None:
    _check_index("block_table", block_table, 2)
    _check_index("seq_lens", seq_lens, 1)
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (as q), got {t.device}")
    B = q.shape[0]
    _dims("block_table", block_table, (B, None), "batch, max_blocks")
    _dims("seq_lens", seq_lens, (B,), "batch")
    if block_size <= 0:
        raise ValueError("k_cache: block_size (dim 1) must be > 0")


# ---- gqa_decode ---------------------------------------------------------------------------------------------
def _validate_gqa_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                         soft_cap: float, window: int) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=3)
    check_tensor("k_cache", k_cache, dim=4)
    check_tensor("v_cache", v_cache, dim=4)
    _same("k_cache", k_cache, "q", q)
    _same("v_cache", v_cache, "q", q)
    B, hq, d = q.shape
    nb, bs, hkv = k_cache.shape[:3]
    _dims("k_cache", k_cache, (None, None, None, d), "num_blocks, block_size, kv_heads, head_dim of q")
    _dims("v_cache", v_cache, (nb, bs, hkv, None), "num_blocks, block_size, kv_heads as k_cache")
    if hkv <= 0 or hq % hkv:
        raise ValueError(f"q: q_heads={hq} must be a multiple of kv_heads={hkv} (k_cache dim 2)")
    if d <= 0 or v_cache.shape[-1] <= 0:
        raise ValueError(f"q: head dims must be > 0, got head_dim={d}, v_dim={v_cache.shape[-1]}")
    _check_decode_tables(q, block_table, seq_lens, nb, bs)
    if not isinstance(soft_cap, (int, float)) or not math.isfinite(soft_cap) or soft_cap < 0:
        raise ValueError(f"soft_cap: expected a finite number > 0 or None, got {soft_cap!r}")
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window: expected a positive int or None, got {window!r}")


def _gqa_decode_ref(out, q, k_cache, v_cache, block_table, seq_lens, scale, soft_cap, window) -> None:
    out.copy_(ref.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, scale, soft_cap or None, window or None))


def _gqa_decode_cpu(out, q, k_cache, v_cache, block_table, seq_lens, scale, soft_cap, window) -> None:
    _ext.cpp().gqa_decode(out, _inner_contig(q), k_cache, v_cache, block_table, seq_lens, scale, soft_cap, window)


def _gqa_decode_triton(out, q, k_cache, v_cache, block_table, seq_lens, scale, soft_cap, window) -> None:
    from omniops.triton.attention import gqa_decode_forward

    gqa_decode_forward(out, q, k_cache, v_cache, block_table, seq_lens, scale, soft_cap, window)


def _cpu_cache_reason(dim_limit: int, *caches: Tensor) -> str | None:
    for c in caches:
        if c.shape[-1] > 1 and c.stride(-1) != 1:
            return "the cache's last dimension must be contiguous"
        if c.shape[-1] > dim_limit:
            return f"head dims above {dim_limit} are not supported by the cpu kernels"
    return None


GQA_DECODE = OpFamily(
    "gqa_decode", {"reference": _gqa_decode_ref, "cpu": _gqa_decode_cpu, "triton": _gqa_decode_triton},
    supports={"cpu": lambda out, q, kc, vc, *rest: _cpu_cache_reason(CPU_MAX_DECODE_DIM, kc, vc)},
)


def _fake_gqa_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                     scale: float, soft_cap: float, window: int, validate: bool) -> Tensor:
    _validate_gqa_decode(q, k_cache, v_cache, block_table, seq_lens, soft_cap, window)
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


@omni_op("gqa_decode", fake=_fake_gqa_decode)
def _gqa_decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                   scale: float, soft_cap: float, window: int, validate: bool) -> Tensor:
    _validate_gqa_decode(q, k_cache, v_cache, block_table, seq_lens, soft_cap, window)
    if validate:
        _check_table_values(block_table, seq_lens, "seq_lens", k_cache.shape[0], k_cache.shape[1])
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    if out.numel() == 0:
        return out
    impl = GQA_DECODE.select(q.device, q.dtype, out, q, k_cache, v_cache)
    impl(out, q, k_cache, v_cache, block_table, seq_lens, scale, float(soft_cap), int(window))
    return out


def gqa_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
               scale: float | None = None, *, soft_cap: float | None = None, window: int | None = None,
               validate: bool = True) -> Tensor:
    """Paged decode attention, one query token per sequence (at position ``seq_len - 1``).

    Args:
        q: ``[B, Hq, D]`` float32/float16/bfloat16.
        k_cache: ``[num_blocks, block_size, Hkv, D]``; Hq must be a multiple of Hkv (GQA; Hkv = Hq is MHA).
        v_cache: ``[num_blocks, block_size, Hkv, Dv]``.
        block_table: ``[B, max_blocks]`` int32; seq_lens: ``[B]`` int32, each <= max_blocks * block_size.
        scale: score scale, default ``1/sqrt(D)``.
        soft_cap: scores become ``soft_cap * tanh(s / soft_cap)`` (Gemma-2 style); None = off.
        window: attend only to the last ``window`` keys (sliding window); None = all.
        validate: check the index values (one pass over block_table/seq_lens, a device sync on GPU).

    Returns ``[B, Hq, Dv]``. Softmax and accumulation in fp32; the cpu and triton backends split long contexts
    over cores/SMs (flash-decoding) and merge the partial softmaxes.

    Example::

        out = omniops.gqa_decode(q, k_cache, v_cache, block_table, seq_lens)  # q [B, 32, 128], caches 8 heads
    """
    sc = _scale(scale, q.shape[-1] if isinstance(q, Tensor) and q.dim() else 0)
    return call(_gqa_decode_op, q, k_cache, v_cache, block_table, seq_lens, sc, float(soft_cap or 0.0),
                int(window or 0), bool(validate))


# ---- mla_decode ---------------------------------------------------------------------------------------------
def _validate_mla_decode(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, v_dim: int) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=3)
    check_tensor("kv_cache", kv_cache, dim=3)
    _same("kv_cache", kv_cache, "q", q)
    L = q.shape[-1]
    _dims("kv_cache", kv_cache, (None, None, L), "num_blocks, block_size, head_dim of q (kv_lora_rank + rope_dim)")
    if not isinstance(v_dim, int) or not 0 < v_dim <= L:
        raise ValueError(f"v_dim: expected an int in [1, head_dim={L}], got {v_dim!r}")
    _check_decode_tables(q, block_table, seq_lens, kv_cache.shape[0], kv_cache.shape[1])


def _mla_decode_ref(out, q, kv_cache, block_table, seq_lens, scale, v_dim) -> None:
    out.copy_(ref.mla_decode(q, kv_cache, block_table, seq_lens, scale, v_dim))


def _mla_decode_cpu(out, q, kv_cache, block_table, seq_lens, scale, v_dim) -> None:
    _ext.cpp().mla_decode(out, _inner_contig(q), kv_cache, block_table, seq_lens, scale, v_dim)


def _mla_decode_triton(out, q, kv_cache, block_table, seq_lens, scale, v_dim) -> None:
    from omniops.triton.attention import mla_decode_forward

    mla_decode_forward(out, q, kv_cache, block_table, seq_lens, scale, v_dim)


MLA_DECODE = OpFamily(
    "mla_decode", {"reference": _mla_decode_ref, "cpu": _mla_decode_cpu, "triton": _mla_decode_triton},
    supports={"cpu": lambda out, q, kv, *rest: _cpu_cache_reason(CPU_MAX_DECODE_DIM, kv)},
)


def _fake_mla_decode(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float, v_dim: int,
                     validate: bool) -> Tensor:
    _validate_mla_decode(q, kv_cache, block_table, seq_lens, v_dim)
    return q.new_empty(q.shape[0], q.shape[1], v_dim)


@omni_op("mla_decode", fake=_fake_mla_decode)
def _mla_decode_op(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float, v_dim: int,
                   validate: bool) -> Tensor:
    _validate_mla_decode(q, kv_cache, block_table, seq_lens, v_dim)
    if validate:
        _check_table_values(block_table, seq_lens, "seq_lens", kv_cache.shape[0], kv_cache.shape[1])
    out = q.new_empty(q.shape[0], q.shape[1], v_dim)
    if out.numel() == 0:
        return out
    MLA_DECODE.select(q.device, q.dtype, out, q, kv_cache)(out, q, kv_cache, block_table, seq_lens, scale, v_dim)
    return out


def mla_decode(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float | None = None, *,
               v_dim: int = 512, validate: bool = True) -> Tensor:
    """Weight-absorbed MLA decode (DeepSeek-V2/V3): all H heads attend to one shared latent cache.

    Args:
        q: ``[B, H, L]`` = absorbed ``q_nope @ W_UK`` (v_dim) ++ ``q_pe`` (rope dims); L = 576 for DeepSeek-V3.
        kv_cache: ``[num_blocks, block_size, L]`` rows ``cat(kv_c, k_pe)`` (see ``mla_cache``). Keys are the
            whole rows, values their first ``v_dim`` dims.
        block_table: ``[B, max_blocks]`` int32; seq_lens ``[B]`` int32.
        scale: default ``1/sqrt(L)``; DeepSeek uses ``1/sqrt(qk_nope + qk_rope) = 1/sqrt(192)`` (times mscale).
        validate: check the index values (one pass over block_table/seq_lens, a device sync on GPU).

    Returns ``[B, H, v_dim]`` (multiply by ``W_UV`` per head to get the attention output). Each cache row is
    loaded once per (sequence, split) and used by all H heads.

    Example::

        out = omniops.mla_decode(q, kv_cache, block_table, seq_lens, scale=192 ** -0.5)  # q [B, 16, 576]
    """
    sc = _scale(scale, q.shape[-1] if isinstance(q, Tensor) and q.dim() else 0)
    return call(_mla_decode_op, q, kv_cache, block_table, seq_lens, sc, v_dim, bool(validate))


# ---- gqa_prefill --------------------------------------------------------------------------------------------
def _validate_gqa_prefill(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, k_cache: Tensor | None,
                          v_cache: Tensor | None, block_table: Tensor | None, context_lens: Tensor | None) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=3)
    check_tensor("k", k, dim=3)
    check_tensor("v", v, dim=3)
    _same("k", k, "q", q)
    _same("v", v, "q", q)
    T, hq, d = q.shape
    hkv = k.shape[1]
    _dims("k", k, (T, None, d), "tokens, kv_heads, head_dim of q")
    _dims("v", v, (T, hkv, None), "tokens, kv_heads as k")
    if hkv <= 0 or hq % hkv:
        raise ValueError(f"q: q_heads={hq} must be a multiple of kv_heads={hkv} (k dim 1)")
    if d <= 0 or v.shape[-1] <= 0:
        raise ValueError(f"q: head dims must be > 0, got head_dim={d}, v_dim={v.shape[-1]}")
    _check_index("cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: expected device {q.device} (as q), got {cu_seqlens.device}")
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens: expected [batch + 1] offsets, got an empty tensor")
    given = [x is not None for x in (k_cache, v_cache, block_table, context_lens)]
    if any(given) and not all(given):
        raise ValueError("k_cache, v_cache, block_table, context_lens: pass all four (paged prefix) or none")
    if all(given):
        check_tensor("k_cache", k_cache, dim=4)
        check_tensor("v_cache", v_cache, dim=4)
        _same("k_cache", k_cache, "q", q)
        _same("v_cache", v_cache, "q", q)
        nb, bs = k_cache.shape[:2]
        _dims("k_cache", k_cache, (None, None, hkv, d), "num_blocks, block_size, kv_heads, head_dim as k")
        _dims("v_cache", v_cache, (nb, bs, hkv, v.shape[-1]), "as k_cache, v_dim of v")
        B = cu_seqlens.shape[0] - 1
        _check_index("block_table", block_table, 2)
        _check_index("context_lens", context_lens, 1)
        for name, t in (("block_table", block_table), ("context_lens", context_lens)):
            if t.device != q.device:
                raise ValueError(f"{name}: expected device {q.device} (as q), got {t.device}")
        _dims("block_table", block_table, (B, None), "batch, max_blocks")
        _dims("context_lens", context_lens, (B,), "batch")
        if bs <= 0:
            raise ValueError("k_cache: block_size (dim 1) must be > 0")


def _gqa_prefill_ref(out, q, k, v, cu_seqlens, causal, scale, k_cache, v_cache, block_table, context_lens) -> None:
    out.copy_(ref.gqa_prefill(q, k, v, cu_seqlens, causal, scale, k_cache, v_cache, block_table, context_lens))


def _gqa_prefill_cpu(out, q, k, v, cu_seqlens, causal, scale, k_cache, v_cache, block_table, context_lens) -> None:
    _ext.cpp().gqa_prefill(out, _inner_contig(q), _inner_contig(k), _inner_contig(v), cu_seqlens, causal, scale,
                           k_cache, v_cache, block_table, context_lens)


def _gqa_prefill_triton(out, q, k, v, cu_seqlens, causal, scale, k_cache, v_cache, block_table, context_lens) -> None:
    from omniops.triton.attention import gqa_prefill_forward

    gqa_prefill_forward(out, q, k, v, cu_seqlens, causal, scale, k_cache, v_cache, block_table, context_lens)


def _prefill_cpu_reason(out, q, k, v, k_cache, v_cache) -> str | None:
    if max(q.shape[-1], v.shape[-1]) > CPU_MAX_PREFILL_DIM:
        return f"head dims above {CPU_MAX_PREFILL_DIM} are not supported by the cpu prefill kernel"
    return _cpu_cache_reason(CPU_MAX_PREFILL_DIM, *(c for c in (k_cache, v_cache) if c is not None))


GQA_PREFILL = OpFamily(
    "gqa_prefill", {"reference": _gqa_prefill_ref, "cpu": _gqa_prefill_cpu, "triton": _gqa_prefill_triton},
    supports={"cpu": _prefill_cpu_reason},
)


def _fake_gqa_prefill(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool, scale: float,
                      k_cache: Tensor | None, v_cache: Tensor | None, block_table: Tensor | None,
                      context_lens: Tensor | None, validate: bool) -> Tensor:
    _validate_gqa_prefill(q, k, v, cu_seqlens, k_cache, v_cache, block_table, context_lens)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


@omni_op("gqa_prefill", fake=_fake_gqa_prefill)
def _gqa_prefill_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool, scale: float,
                    k_cache: Tensor | None, v_cache: Tensor | None, block_table: Tensor | None,
                    context_lens: Tensor | None, validate: bool) -> Tensor:
    _validate_gqa_prefill(q, k, v, cu_seqlens, k_cache, v_cache, block_table, context_lens)
    if validate:
        _check_cu_values(cu_seqlens, q.shape[0])
        if k_cache is not None:
            _check_table_values(block_table, context_lens, "context_lens", k_cache.shape[0], k_cache.shape[1])
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    if out.numel() == 0:
        return out
    impl = GQA_PREFILL.select(q.device, q.dtype, out, q, k, v, k_cache, v_cache)
    impl(out, q, k, v, cu_seqlens, causal, scale, k_cache, v_cache, block_table, context_lens)
    return out


def gqa_prefill(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, causal: bool = True,
                scale: float | None = None, k_cache: Tensor | None = None, v_cache: Tensor | None = None,
                block_table: Tensor | None = None, context_lens: Tensor | None = None,
                validate: bool = True) -> Tensor:
    """Packed variable-length prefill attention (flash-attention varlen), optionally after a paged prefix.

    Args:
        q: ``[T, Hq, D]``; k: ``[T, Hkv, D]``; v: ``[T, Hkv, Dv]`` (D=192, Dv=128 for DeepSeek's MLA prefill).
        cu_seqlens: ``[B + 1]`` int32 offsets: sequence b owns tokens ``cu_seqlens[b]:cu_seqlens[b+1]``.
        causal: new token j of sequence b (at position ``context_lens[b] + j``) sees keys at positions <= its own.
        k_cache, v_cache, block_table, context_lens: all or none. With them sequence b first attends to its
            ``context_lens[b]`` tokens already in the paged cache (chunked prefill / prefix caching).
        validate: check cu_seqlens and the table values (one pass, a device sync on GPU).

    Returns ``[T, Hq, Dv]``.

    Example::

        out = omniops.gqa_prefill(q, k, v, torch.tensor([0, 5, 12], dtype=torch.int32))
    """
    sc = _scale(scale, q.shape[-1] if isinstance(q, Tensor) and q.dim() else 0)
    return call(_gqa_prefill_op, q, k, v, cu_seqlens, bool(causal), sc, k_cache, v_cache, block_table, context_lens,
                bool(validate))


# ---- gqa_attention (contiguous K/V, SDPA layout) --------------------------------------------------------------
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
    check_tensor("k", k, dim=4)
    check_tensor("v", v, dim=4)
    _same("k", k, "q", q)
    _same("v", v, "q", q)
    B, hq, S, d = q.shape
    hk, L = k.shape[1], k.shape[2]
    _dims("k", k, (B, None, None, d), "batch of q, kv_heads, kv_len, head_dim of q")
    _dims("v", v, (B, hk, L, None), "batch, kv_heads, kv_len as k")
    if hk <= 0 or hq % hk:
        raise ValueError(f"q: q_heads={hq} (dim 1) must be a multiple of kv_heads={hk} (k dim 1)")
    if d <= 0 or v.shape[-1] <= 0:
        raise ValueError(f"q: head dims must be > 0, got head_dim={d}, v_dim={v.shape[-1]}")
    if S > L:
        raise ValueError(f"q: query length {S} (dim 2) exceeds the key length {L} (k dim 2); the keys include the "
                         "queries' own positions (KV-cache attention)")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask: expected a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask: expected bool (True = attend) or a float dtype (added), got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask: expected device {q.device} (as q), got {attn_mask.device}")
        _mask_shape(attn_mask, B, hq, S, L)


def _gqa_attention_ref(out, q, k, v, attn_mask, causal, scale) -> None:
    out.copy_(ref.gqa_attention(q, k, v, attn_mask, causal, scale))


def _gqa_attention_cpu(out, q, k, v, attn_mask, causal, scale) -> None:
    B, hq, S, _ = q.shape
    m = None
    if attn_mask is not None:
        m = _mask_4d(attn_mask, B, hq, S, k.shape[2])
        if m.dtype != torch.bool and m.dtype != torch.float32:
            m = m.float()
    _ext.cpp().dense_attention(out, _inner_contig(q), _inner_contig(k), _inner_contig(v), m, causal, scale)


def _gqa_attention_triton(out, q, k, v, attn_mask, causal, scale) -> None:
    # The paged kernels over a "cache" of one block per sequence (no copy of the keys): decode for S == 1, one
    # prefill launch per sequence otherwise (its first L - S keys are the cached prefix).
    from omniops.triton.attention import gqa_decode_forward, gqa_prefill_forward

    B, hq, S, _ = q.shape
    L = k.shape[2]
    q, k, v = _inner_contig(q), _inner_contig(k), _inner_contig(v)
    i32 = dict(dtype=torch.int32, device=q.device)
    kc, vc = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    if S == 1:
        table = torch.arange(B, **i32)[:, None]
        gqa_decode_forward(out[:, :, 0], q[:, :, 0], kc, vc, table, torch.full((B,), L, **i32), scale, 0.0, 0)
        return
    table, ctx, cu = torch.zeros(1, 1, **i32), torch.full((1,), L - S, **i32), torch.tensor([0, S], **i32)
    for b in range(B):
        gqa_prefill_forward(out[b].transpose(0, 1), q[b].transpose(0, 1), k[b, :, L - S:].transpose(0, 1),
                            v[b, :, L - S:].transpose(0, 1), cu, causal, scale, kc[b:b + 1], vc[b:b + 1], table, ctx)


def _attention_cpu_reason(out, q, k, v, attn_mask) -> str | None:
    limit = CPU_MAX_DECODE_DIM if q.shape[2] == 1 else CPU_MAX_PREFILL_DIM
    if max(q.shape[-1], v.shape[-1]) > limit:
        return f"head dims above {limit} are not supported by the cpu kernels"
    return None


GQA_ATTENTION = OpFamily(
    "gqa_attention", {"reference": _gqa_attention_ref, "cpu": _gqa_attention_cpu, "triton": _gqa_attention_triton},
    supports={"cpu": _attention_cpu_reason,
              "triton": lambda out, q, k, v, m: None if m is None else "attn_mask is not supported by the triton "
                                                                        "kernels (causal and no mask only)"},
)


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
    _validate_gqa_attention(q, k, v, attn_mask, causal)
    out = _attention_out(q, v)
    if out.numel() == 0:
        return out
    if k.shape[2] == 0:
        return out.zero_()
    impl = GQA_ATTENTION.select(q.device, q.dtype, out, q, k, v, attn_mask)
    impl(out, q, k, v, attn_mask, causal, scale)
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
    (SDPA: NaN). Backends: cpu (the paged kernels of ``ascendc/kernels/attention`` over one block per sequence),
    triton (no ``attn_mask``), reference.

    Example::

        out = omniops.gqa_attention(q, k_cache, v_cache, causal=True)  # q [2, 8, 5, 64], k/v [2, 2, 37, 64]
    """
    sc = _scale(scale, q.shape[-1] if isinstance(q, Tensor) and q.dim() else 0)
    return call(_gqa_attention_op, q, k, v, attn_mask, bool(causal), sc)


# ---- reshape_and_cache / mla_cache --------------------------------------------------------------------------
def _validate_slots(slot_mapping: Tensor, tokens: int, ref_t: Tensor) -> None:
    _check_index("slot_mapping", slot_mapping, 1, (torch.int32, torch.int64))
    if slot_mapping.device != ref_t.device:
        raise ValueError(f"slot_mapping: expected device {ref_t.device}, got {slot_mapping.device}")
    _dims("slot_mapping", slot_mapping, (tokens,), "one slot per token")


def _validate_reshape_and_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
                                slot_mapping: Tensor) -> None:
    check_tensor("key", key, dtypes=FLOAT_DTYPES, dim=3)
    check_tensor("value", value, dim=3)
    check_tensor("k_cache", k_cache, dim=4)
    check_tensor("v_cache", v_cache, dim=4)
    _same("value", value, "key", key)
    _same("k_cache", k_cache, "key", key)
    _same("v_cache", v_cache, "key", key)
    T, h, d = key.shape
    _dims("value", value, (T, h, None), "tokens, kv_heads as key")
    _dims("k_cache", k_cache, (None, None, h, d), "num_blocks, block_size, kv_heads, head_dim of key")
    _dims("v_cache", v_cache, (k_cache.shape[0], k_cache.shape[1], h, value.shape[-1]), "as k_cache, head_dim of value")
    _validate_slots(slot_mapping, T, key)


def _rac_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    ref.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def _rac_cpu(key, value, k_cache, v_cache, slot_mapping) -> None:
    _ext.cpp().reshape_and_cache(_inner_contig(key), _inner_contig(value), k_cache, v_cache, slot_mapping.long())


def _rac_triton(key, value, k_cache, v_cache, slot_mapping) -> None:
    from omniops.triton.attention import reshape_and_cache_forward

    reshape_and_cache_forward(key, value, k_cache, v_cache, slot_mapping)


RESHAPE_AND_CACHE = OpFamily(
    "reshape_and_cache", {"reference": _rac_ref, "cpu": _rac_cpu, "triton": _rac_triton},
    supports={"cpu": lambda key, value, kc, vc, sm: _cpu_cache_reason(1 << 30, kc, vc)},
)


def _fake_rac(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
              validate: bool) -> None:
    _validate_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


@omni_op("reshape_and_cache", mutates_args=("k_cache", "v_cache"), fake=_fake_rac)
def _rac_op(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
            validate: bool) -> None:
    _validate_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
    if validate:
        _check_slot_values(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    if key.shape[0] == 0 or k_cache.numel() == 0:
        return
    RESHAPE_AND_CACHE.select(key.device, key.dtype, key, value, k_cache, v_cache, slot_mapping)(
        key, value, k_cache, v_cache, slot_mapping)


def reshape_and_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, *,
                      validate: bool = True) -> None:
    """Write new tokens' ``key [T, Hkv, D]`` / ``value [T, Hkv, Dv]`` into the paged caches in place.

    ``slot_mapping [T]`` (int32/int64): ``block * block_size + offset`` per token, -1 = skip (padding).
    ``validate`` checks the slots are in ``[-1, num_blocks * block_size)`` (one pass, a device sync on GPU).

    Example::

        omniops.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    """
    call(_rac_op, key, value, k_cache, v_cache, slot_mapping, bool(validate))


def _validate_mla_cache(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    check_tensor("kv_c", kv_c, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("k_pe", k_pe, dim=2)
    check_tensor("kv_cache", kv_cache, dim=3)
    _same("k_pe", k_pe, "kv_c", kv_c)
    _same("kv_cache", kv_cache, "kv_c", kv_c)
    T, r = kv_c.shape
    _dims("k_pe", k_pe, (T, None), "tokens as kv_c")
    _dims("kv_cache", kv_cache, (None, None, r + k_pe.shape[1]), "num_blocks, block_size, kv_lora_rank + rope_dim")
    _validate_slots(slot_mapping, T, kv_c)


def _mla_cache_ref(kv_c, k_pe, kv_cache, slot_mapping) -> None:
    ref.mla_cache(kv_c, k_pe, kv_cache, slot_mapping)


def _mla_cache_cpu(kv_c, k_pe, kv_cache, slot_mapping) -> None:
    _ext.cpp().mla_cache(_inner_contig(kv_c), _inner_contig(k_pe), kv_cache, slot_mapping.long())


def _mla_cache_triton(kv_c, k_pe, kv_cache, slot_mapping) -> None:
    from omniops.triton.attention import mla_cache_forward

    mla_cache_forward(kv_c, k_pe, kv_cache, slot_mapping)


MLA_CACHE = OpFamily(
    "mla_cache", {"reference": _mla_cache_ref, "cpu": _mla_cache_cpu, "triton": _mla_cache_triton},
    supports={"cpu": lambda kv_c, k_pe, kv, sm: _cpu_cache_reason(1 << 30, kv)},
)


def _fake_mla_cache(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor, validate: bool) -> None:
    _validate_mla_cache(kv_c, k_pe, kv_cache, slot_mapping)


@omni_op("mla_cache", mutates_args=("kv_cache",), fake=_fake_mla_cache)
def _mla_cache_op(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor, validate: bool) -> None:
    _validate_mla_cache(kv_c, k_pe, kv_cache, slot_mapping)
    if validate:
        _check_slot_values(slot_mapping, kv_cache.shape[0] * kv_cache.shape[1])
    if kv_c.shape[0] == 0 or kv_cache.numel() == 0:
        return
    MLA_CACHE.select(kv_c.device, kv_c.dtype, kv_c, k_pe, kv_cache, slot_mapping)(kv_c, k_pe, kv_cache, slot_mapping)


def mla_cache(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor, *, validate: bool = True) -> None:
    """Write MLA latents into the paged cache in place: ``kv_cache[slot] = cat(kv_c, k_pe)``.

    ``kv_c [T, kv_lora_rank]`` (512), ``k_pe [T, rope_dim]`` (64, already rotated), ``kv_cache
    [num_blocks, block_size, 576]``, ``slot_mapping [T]`` (-1 = skip). ``validate`` as in reshape_and_cache.

    Example::

        omniops.mla_cache(kv_c, k_pe, kv_cache, slot_mapping)
    """
    call(_mla_cache_op, kv_c, k_pe, kv_cache, slot_mapping, bool(validate))
