"""Attention over a paged KV cache: GQA and weight-absorbed MLA decode, varlen prefill with a paged prefix.

Public API: ``gqa_decode``, ``mla_decode``, ``gqa_prefill``; custom ops ``omni::<name>``. The cache writers are
in ``omniops/ops/cache_ops.py``, attention over contiguous K/V in ``omniops/ops/gqa_attention.py``.
Kernels: ``ascendc/kernels/attention/`` (cpu), ``omniops/triton/attention.py``; oracle
``omniops/reference/attention.py``.

Cache layouts (vLLM's): ``k_cache/v_cache [num_blocks, block_size, kv_heads, head_dim]``, MLA
``kv_cache [num_blocks, block_size, kv_lora_rank + rope_dim]`` (576 = 512 + 64 for DeepSeek-V2/V3). Token ``i``
of sequence ``b`` is at block ``block_table[b, i // block_size]``, offset ``i % block_size``
(``slot = block * block_size + offset``). Only the ``ceil(seq_len / block_size)`` table entries a sequence's
length covers are read (and checked); a sequence of length 0 gives zeros.

Input checks: shapes/dtypes/devices (metadata, free) always; index values (``validate=True``, the default) cost
one pass over ``block_table``/``seq_lens`` (or ``cu_seqlens``) with torch ops plus one host-device sync on GPU.
Callers that build their tables themselves can pass ``validate=False``; the C++ entry points in ``omniops._C``
re-check the values anyway (they are reachable directly), Triton kernels do not.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from omniops._family import OpFamily
from omniops._registry import call, fast_cpu, omni_op
from omniops._validation import FLOAT_DTYPES, check_bool, check_float, check_int, check_tensor
from omniops.ops._attention_checks import (
    CPU_MAX_DECODE_DIM,
    CPU_MAX_PREFILL_DIM,
    check_cu_values,
    check_dims,
    check_heads,
    check_index,
    check_keys_values,
    check_like,
    check_table_values,
    check_tables,
    cpu_cache_reason,
    resolve_scale,
)
from omniops.ops._layout import inner_contiguous
from omniops.reference import attention as ref


def _run(family: OpFamily, args: tuple, validate: bool, check_values: Callable[[], None]) -> Tensor:
    """Run the backend ``family`` selects for ``args = (out, q, ...)`` (none for an empty ``out``) and return out;
    ``check_values()`` first when ``validate``, unless that backend is the C++ entry point (it checks the values
    itself)."""
    out, q = args[0], args[1]
    impl = family.select(q.device, q.dtype, *args) if out.numel() else None
    if validate and impl is not family.cpu_impl():
        check_values()
    if impl is not None:
        impl(*args)
    return out


# ---- gqa_decode ---------------------------------------------------------------------------------------------
def _gqa_decode_reference(out: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                          seq_lens: Tensor, scale: float, soft_cap: float | None, window: int | None) -> None:
    """The backends' form: out [B, Hq, Dv] contiguous, q with a unit inner stride."""
    out.copy_(ref.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, scale, soft_cap, window))


GQA_DECODE = OpFamily(
    "gqa_decode", _gqa_decode_reference,
    supports={"cpu": lambda out, q, k_cache, v_cache, *_: cpu_cache_reason(CPU_MAX_DECODE_DIM, k_cache, v_cache)},
)


def _validate_gqa_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                         soft_cap: float | None, window: int | None) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=3)
    check_keys_values("k_cache", k_cache, "v_cache", v_cache, 4, q)
    B, hq, d = q.shape
    nb, bs, hkv = k_cache.shape[:3]
    check_dims("k_cache", k_cache, (None, None, None, d), "num_blocks, block_size, kv_heads, head_dim of q")
    check_dims("v_cache", v_cache, (nb, bs, hkv, None), "num_blocks, block_size, kv_heads as k_cache")
    check_heads(hq, hkv, "k_cache dim 2", d, v_cache.shape[-1])
    check_tables(q, block_table, seq_lens, "seq_lens", B, bs)
    if soft_cap is not None:
        check_float("soft_cap", soft_cap, lo=0.0)  # finite in fp32 (the kernels' type)
    if window is not None:
        check_int("window", window, lo=0)  # an int: 1.5 is not truncated


def _fake_gqa_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                     scale: float, soft_cap: float | None, window: int | None, validate: bool) -> Tensor:
    _validate_gqa_decode(q, k_cache, v_cache, block_table, seq_lens, soft_cap, window)
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


@omni_op("gqa_decode", fake=_fake_gqa_decode)
def _gqa_decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                   scale: float, soft_cap: float | None, window: int | None, validate: bool) -> Tensor:
    out = _fake_gqa_decode(q, k_cache, v_cache, block_table, seq_lens, scale, soft_cap, window, validate)
    args = (out, inner_contiguous(q), k_cache, v_cache, block_table, seq_lens, scale, soft_cap, window)
    return _run(GQA_DECODE, args, validate,
                lambda: check_table_values(block_table, seq_lens, "seq_lens", k_cache.shape[0], k_cache.shape[1]))


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
    return call(_gqa_decode_op, q, k_cache, v_cache, block_table, seq_lens, resolve_scale(scale, q), soft_cap,
                window, check_bool("validate", validate))


# ---- mla_decode ---------------------------------------------------------------------------------------------
def _mla_decode_reference(out: Tensor, q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                          scale: float, v_dim: int) -> None:
    """The backends' form: out [B, H, v_dim] contiguous, q with a unit inner stride."""
    out.copy_(ref.mla_decode(q, kv_cache, block_table, seq_lens, scale, v_dim))


MLA_DECODE = OpFamily(
    "mla_decode", _mla_decode_reference,
    supports={"cpu": lambda out, q, kv_cache, *_: cpu_cache_reason(CPU_MAX_DECODE_DIM, kv_cache)},
)


def _validate_mla_decode(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, v_dim: int) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=3)
    check_tensor("kv_cache", kv_cache, dim=3)
    check_like("kv_cache", kv_cache, "q", q)
    L = q.shape[-1]
    check_dims("kv_cache", kv_cache, (None, None, L), "num_blocks, block_size, head_dim of q (kv_lora_rank + rope_dim)")
    if not 0 < check_int("v_dim", v_dim) <= L:
        raise ValueError(f"v_dim: expected an int in [1, head_dim={L}], got {v_dim!r}")
    check_tables(q, block_table, seq_lens, "seq_lens", q.shape[0], kv_cache.shape[1], "kv_cache")


def _fake_mla_decode(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float, v_dim: int,
                     validate: bool) -> Tensor:
    _validate_mla_decode(q, kv_cache, block_table, seq_lens, v_dim)
    return q.new_empty(q.shape[0], q.shape[1], v_dim)


@omni_op("mla_decode", fake=_fake_mla_decode)
def _mla_decode_op(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float, v_dim: int,
                   validate: bool) -> Tensor:
    out = _fake_mla_decode(q, kv_cache, block_table, seq_lens, scale, v_dim, validate)
    args = (out, inner_contiguous(q), kv_cache, block_table, seq_lens, scale, v_dim)
    return _run(MLA_DECODE, args, validate,
                lambda: check_table_values(block_table, seq_lens, "seq_lens", kv_cache.shape[0], kv_cache.shape[1]))


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
    return call(_mla_decode_op, q, kv_cache, block_table, seq_lens, resolve_scale(scale, q), v_dim,
                check_bool("validate", validate))


# ---- gqa_prefill --------------------------------------------------------------------------------------------
def _gqa_prefill_reference(out: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool,
                           scale: float, k_cache: Tensor | None, v_cache: Tensor | None, block_table: Tensor | None,
                           context_lens: Tensor | None) -> None:
    """The backends' form: out [T, Hq, Dv] contiguous, q/k/v with unit inner strides."""
    out.copy_(ref.gqa_prefill(q, k, v, cu_seqlens, causal, scale, k_cache, v_cache, block_table, context_lens))


def _prefill_cpu_reason(out: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool,
                        scale: float, k_cache: Tensor | None, v_cache: Tensor | None, *_: object) -> str | None:
    if max(q.shape[-1], v.shape[-1]) > CPU_MAX_PREFILL_DIM:
        return f"head dims above {CPU_MAX_PREFILL_DIM} are not supported by the cpu prefill kernel"
    return cpu_cache_reason(CPU_MAX_PREFILL_DIM, *(c for c in (k_cache, v_cache) if c is not None))


GQA_PREFILL = OpFamily("gqa_prefill", _gqa_prefill_reference, supports={"cpu": _prefill_cpu_reason})


def _validate_gqa_prefill(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, k_cache: Tensor | None,
                          v_cache: Tensor | None, block_table: Tensor | None, context_lens: Tensor | None) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=3)
    check_keys_values("k", k, "v", v, 3, q)
    T, hq, d = q.shape
    hkv = k.shape[1]
    check_dims("k", k, (T, None, d), "tokens, kv_heads, head_dim of q")
    check_dims("v", v, (T, hkv, None), "tokens, kv_heads as k")
    check_heads(hq, hkv, "k dim 1", d, v.shape[-1])
    check_index("cu_seqlens", cu_seqlens, 1, q)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens: expected [batch + 1] offsets, got an empty tensor")
    given = [x is not None for x in (k_cache, v_cache, block_table, context_lens)]
    if any(given) and not all(given):
        raise ValueError("k_cache, v_cache, block_table, context_lens: pass all four (paged prefix) or none")
    if all(given):
        check_keys_values("k_cache", k_cache, "v_cache", v_cache, 4, q)
        nb, bs = k_cache.shape[:2]
        check_dims("k_cache", k_cache, (None, None, hkv, d), "num_blocks, block_size, kv_heads, head_dim as k")
        check_dims("v_cache", v_cache, (nb, bs, hkv, v.shape[-1]), "as k_cache, v_dim of v")
        check_tables(q, block_table, context_lens, "context_lens", cu_seqlens.shape[0] - 1, bs)


def _fake_gqa_prefill(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool, scale: float,
                      k_cache: Tensor | None, v_cache: Tensor | None, block_table: Tensor | None,
                      context_lens: Tensor | None, validate: bool) -> Tensor:
    _validate_gqa_prefill(q, k, v, cu_seqlens, k_cache, v_cache, block_table, context_lens)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


@omni_op("gqa_prefill", fake=_fake_gqa_prefill)
def _gqa_prefill_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool, scale: float,
                    k_cache: Tensor | None, v_cache: Tensor | None, block_table: Tensor | None,
                    context_lens: Tensor | None, validate: bool) -> Tensor:
    out = _fake_gqa_prefill(q, k, v, cu_seqlens, causal, scale, k_cache, v_cache, block_table, context_lens,
                            validate)
    args = (out, inner_contiguous(q), inner_contiguous(k), inner_contiguous(v), cu_seqlens, causal, scale, k_cache,
            v_cache, block_table, context_lens)

    def check_values() -> None:
        check_cu_values(cu_seqlens, q.shape[0])
        if k_cache is not None:
            check_table_values(block_table, context_lens, "context_lens", k_cache.shape[0], k_cache.shape[1])

    return _run(GQA_PREFILL, args, validate, check_values)


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
    C = fast_cpu(q, k, v, cu_seqlens, k_cache, v_cache, block_table, context_lens)
    if (C is not None and type(causal) is bool and type(validate) is bool and isinstance(q, Tensor)
            and isinstance(v, Tensor) and q.dim() == 3 and v.dim() == 3 and q.shape[0] > 0):
        # The common eager call (the engine's every step): straight to C++, which checks the shapes and values.
        try:
            out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
            GQA_PREFILL.cpu_impl()(out, q, k, v, cu_seqlens, causal, resolve_scale(scale, q), k_cache, v_cache,
                                   block_table, context_lens)
            return out
        except (ValueError, TypeError, RuntimeError):
            pass  # the checked path below raises the error of this input (or runs a backend that takes it)
    return call(_gqa_prefill_op, q, k, v, cu_seqlens, check_bool("causal", causal), resolve_scale(scale, q),
                k_cache, v_cache, block_table, context_lens, check_bool("validate", validate))
