"""Writes into the paged KV caches: ``reshape_and_cache`` (GQA keys and values) and ``mla_cache`` (MLA latents).

Public API: ``reshape_and_cache``, ``mla_cache``; custom ops ``omni::<name>`` (they mutate the caches). Cache
layouts as in ``omniops/ops/attention.py``: ``slot = block * block_size + offset``, -1 = skip (padding).
Kernels: ``ascendc/kernels/attention/cache_ops.h`` (cpu), ``omniops/triton/cache_ops.py``; oracle
``omniops/reference/attention.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from omniops._family import OpFamily
from omniops._registry import call, fast_cpu, omni_op
from omniops._validation import FLOAT_DTYPES, check_bool, check_no_overlap, check_tensor
from omniops.ops._attention_checks import (
    check_dims,
    check_index,
    check_keys_values,
    check_like,
    check_slot_values,
    cpu_cache_reason,
)
from omniops.ops._layout import inner_contiguous
from omniops.reference import attention as ref

_ANY_DIM = 1 << 30  # the cache writers copy rows of any width


def _check_slots(slot_mapping: Tensor, tokens: int, ref_t: Tensor, ref_name: str) -> None:
    check_index("slot_mapping", slot_mapping, 1, ref_t, ref_name, (torch.int32, torch.int64))
    check_dims("slot_mapping", slot_mapping, (tokens,), "one slot per token")


# ---- reshape_and_cache ------------------------------------------------------------------------------------
# The backends' form: key/value with unit inner strides, int64 slot_mapping.
RESHAPE_AND_CACHE = OpFamily(
    "reshape_and_cache", ref.reshape_and_cache,
    supports={"cpu": lambda key, value, k_cache, v_cache, slot_mapping: cpu_cache_reason(_ANY_DIM, k_cache, v_cache)},
)


def _validate_reshape_and_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
                                slot_mapping: Tensor) -> None:
    check_tensor("key", key, dtypes=FLOAT_DTYPES, dim=3)
    check_tensor("value", value, dim=3)
    check_like("value", value, "key", key)
    check_keys_values("k_cache", k_cache, "v_cache", v_cache, 4, key, "key")
    T, h, d = key.shape
    check_dims("value", value, (T, h, None), "tokens, kv_heads as key")
    check_dims("k_cache", k_cache, (None, None, h, d), "num_blocks, block_size, kv_heads, head_dim of key")
    check_dims("v_cache", v_cache, (k_cache.shape[0], k_cache.shape[1], h, value.shape[-1]),
               "as k_cache, head_dim of value")
    _check_slots(slot_mapping, T, key, "key")


def _fake_rac(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
              validate: bool) -> None:
    _validate_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


@omni_op("reshape_and_cache", mutates_args=("k_cache", "v_cache"), fake=_fake_rac)
def _rac_op(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
            validate: bool) -> None:
    _validate_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
    args = (inner_contiguous(key), inner_contiguous(value), k_cache, v_cache, slot_mapping.long())
    run = key.shape[0] and k_cache.numel()
    impl = RESHAPE_AND_CACHE.select(key.device, key.dtype, *args) if run else None
    if impl is not RESHAPE_AND_CACHE.cpu_impl():  # the C++ entry point checks the values and the overlap rule
        if validate:
            check_slot_values(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
        check_no_overlap((("k_cache", k_cache), ("v_cache", v_cache)),
                         (("key", key), ("value", value), ("slot_mapping", slot_mapping)))
    if impl is not None:
        impl(*args)


def reshape_and_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, *,
                      validate: bool = True) -> None:
    """Write new tokens' ``key [T, Hkv, D]`` / ``value [T, Hkv, Dv]`` into the paged caches in place.

    ``slot_mapping [T]`` (int32/int64): ``block * block_size + offset`` per token, -1 = skip (padding).
    ``validate`` checks the slots are in ``[-1, num_blocks * block_size)`` (one pass, a device sync on GPU).

    Example::

        omniops.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    """
    C = fast_cpu(key, value, k_cache, v_cache, slot_mapping)
    if (C is not None and type(validate) is bool and isinstance(key, Tensor) and isinstance(k_cache, Tensor)
            and isinstance(slot_mapping, Tensor) and slot_mapping.dtype == torch.int64 and key.dim() == 3
            and key.shape[0] > 0 and k_cache.numel() > 0):
        # The common eager call: straight to C++, which checks shapes, slot values and overlap itself.
        try:
            RESHAPE_AND_CACHE.cpu_impl()(key, value, k_cache, v_cache, slot_mapping)
            return
        except (ValueError, TypeError, RuntimeError):
            pass  # the checked path below raises the error of this input
    call(_rac_op, key, value, k_cache, v_cache, slot_mapping, check_bool("validate", validate))


# ---- mla_cache -------------------------------------------------------------------------------------------
# The backends' form: kv_c/k_pe with unit inner strides, int64 slot_mapping.
MLA_CACHE = OpFamily(
    "mla_cache", ref.mla_cache,
    supports={"cpu": lambda kv_c, k_pe, kv_cache, slot_mapping: cpu_cache_reason(_ANY_DIM, kv_cache)},
)


def _validate_mla_cache(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    check_tensor("kv_c", kv_c, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("k_pe", k_pe, dim=2)
    check_tensor("kv_cache", kv_cache, dim=3)
    check_like("k_pe", k_pe, "kv_c", kv_c)
    check_like("kv_cache", kv_cache, "kv_c", kv_c)
    T, r = kv_c.shape
    check_dims("k_pe", k_pe, (T, None), "tokens as kv_c")
    check_dims("kv_cache", kv_cache, (None, None, r + k_pe.shape[1]), "num_blocks, block_size, kv_lora_rank + rope_dim")
    _check_slots(slot_mapping, T, kv_c, "kv_c")


def _fake_mla_cache(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor, validate: bool) -> None:
    _validate_mla_cache(kv_c, k_pe, kv_cache, slot_mapping)


@omni_op("mla_cache", mutates_args=("kv_cache",), fake=_fake_mla_cache)
def _mla_cache_op(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor, validate: bool) -> None:
    _validate_mla_cache(kv_c, k_pe, kv_cache, slot_mapping)
    args = (inner_contiguous(kv_c), inner_contiguous(k_pe), kv_cache, slot_mapping.long())
    impl = MLA_CACHE.select(kv_c.device, kv_c.dtype, *args) if kv_c.shape[0] and kv_cache.numel() else None
    if impl is not MLA_CACHE.cpu_impl():  # the C++ entry point checks the values and the overlap rule itself
        if validate:
            check_slot_values(slot_mapping, kv_cache.shape[0] * kv_cache.shape[1])
        check_no_overlap((("kv_cache", kv_cache),), (("kv_c", kv_c), ("k_pe", k_pe), ("slot_mapping", slot_mapping)))
    if impl is not None:
        impl(*args)


def mla_cache(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor, *, validate: bool = True) -> None:
    """Write MLA latents into the paged cache in place: ``kv_cache[slot] = cat(kv_c, k_pe)``.

    ``kv_c [T, kv_lora_rank]`` (512), ``k_pe [T, rope_dim]`` (64, already rotated), ``kv_cache
    [num_blocks, block_size, 576]``, ``slot_mapping [T]`` (-1 = skip). ``validate`` as in reshape_and_cache.

    Example::

        omniops.mla_cache(kv_c, k_pe, kv_cache, slot_mapping)
    """
    call(_mla_cache_op, kv_c, k_pe, kv_cache, slot_mapping, check_bool("validate", validate))
