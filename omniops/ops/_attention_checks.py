"""Argument checks shared by the attention ops (paged decode / prefill, dense attention, cache writes).

Metadata checks (shapes, dtypes, devices) run on fake tensors too. Value checks (table entries, sequence
lengths, slots, offsets) read the tensors: one pass with torch ops and one host sync, skipped on fake tensors
and by ``validate=False``; the C++ entry points re-check values themselves (they are reachable directly).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from omniops._validation import check_block_table as check_table_values  # noqa: F401 (overflow-safe; shared)
from omniops._validation import check_float, check_same, check_tensor, is_fake

CPU_MAX_DECODE_DIM = 768  # OMNI_ATTN_MAX_DECODE_DIM in ascendc/include/omni/ops/attention.h
CPU_MAX_PREFILL_DIM = 256  # OMNI_ATTN_MAX_PREFILL_DIM


class ArgumentError(ValueError, TypeError):
    """A mismatched dtype: a ValueError as the attention contract says, and a TypeError as other ops raise."""


def check_like(name: str, t: Tensor, ref_name: str, r: Tensor) -> None:
    """``t`` on ``r``'s device with its dtype (ArgumentError otherwise)."""
    try:
        check_same(name, t, ref_name, r)
    except TypeError as e:
        raise ArgumentError(str(e)) from None


def check_keys_values(k_name: str, k: Tensor, v_name: str, v: Tensor, dim: int, q: Tensor, q_name: str = "q") -> None:
    """Keys and values (or their caches): ``dim``-D tensors with q's dtype and device."""
    check_tensor(k_name, k, dim=dim)
    check_tensor(v_name, v, dim=dim)
    check_like(k_name, k, q_name, q)
    check_like(v_name, v, q_name, q)


def check_heads(q_heads: int, kv_heads: int, where: str, head_dim: int, v_dim: int) -> None:
    """GQA grouping (q heads a multiple of the kv heads, ``where`` those are) and non-empty head dims."""
    if kv_heads <= 0 or q_heads % kv_heads:
        raise ValueError(f"q: q_heads={q_heads} must be a multiple of kv_heads={kv_heads} ({where})")
    if head_dim <= 0 or v_dim <= 0:
        raise ValueError(f"q: head dims must be > 0, got head_dim={head_dim}, v_dim={v_dim}")


def check_dims(name: str, t: Tensor, expected: tuple[int | None, ...], what: str) -> None:
    """``t``'s shape is ``expected`` (None: any size there)."""
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected, strict=False)):
        shape = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name}: expected shape [{shape}] ({what}), got {list(t.shape)}")


def check_index(name: str, t: Tensor, dim: int, ref: Tensor, ref_name: str = "q",
                dtypes: tuple[torch.dtype, ...] = (torch.int32,)) -> None:
    """An index tensor (block table, lengths, offsets, slots) of ``dim`` dims on ``ref``'s device."""
    check_tensor(name, t, dtypes=dtypes, dim=dim)
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")


def check_tables(q: Tensor, block_table: Tensor, lens: Tensor, lens_name: str, batch: int, block_size: int,
                 cache: str = "k_cache") -> None:
    """``block_table [batch, max_blocks]`` and ``lens [batch]`` int32 on q's device; a positive block size."""
    check_index("block_table", block_table, 2, q)
    check_index(lens_name, lens, 1, q)
    check_dims("block_table", block_table, (batch, None), "batch, max_blocks")
    check_dims(lens_name, lens, (batch,), "batch")
    if block_size <= 0:
        raise ValueError(f"{cache}: block_size (dim 1) must be > 0")


def resolve_scale(scale: float | None, q: object) -> float:
    """The score scale: ``scale`` checked, or ``1/sqrt(head_dim)`` of q (the last dim) when None."""
    if scale is None:
        head_dim = q.shape[-1] if isinstance(q, Tensor) and q.dim() else 0
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return check_float("scale", scale)


def cpu_cache_reason(dim_limit: int, *caches: Tensor) -> str | None:
    """Why the cpu kernels cannot read these caches, or None."""
    for c in caches:
        if c.shape[-1] > 1 and c.stride(-1) != 1:
            return "the cache's last dimension must be contiguous"
        if c.shape[-1] > dim_limit:
            return f"head dims above {dim_limit} are not supported by the cpu kernels"
    return None


# ---- value checks (skipped on fake tensors and with validate=False) ----------------------------------------
def check_slot_values(slot_mapping: Tensor, num_slots: int) -> None:
    if slot_mapping.numel() == 0 or is_fake(slot_mapping):
        return
    lo, hi = torch.stack((slot_mapping.min(), slot_mapping.max())).tolist()
    if lo < -1 or hi >= num_slots:
        i = int(((slot_mapping < -1) | (slot_mapping >= num_slots)).nonzero()[0, 0])
        raise ValueError(f"slot_mapping[{i}] = {int(slot_mapping[i])} is outside [-1, {num_slots}) "
                         "(-1 = skip; num_blocks * block_size slots)")


def check_cu_values(cu_seqlens: Tensor, tokens: int) -> None:
    if is_fake(cu_seqlens):
        return
    first, last, dec = torch.stack((cu_seqlens[0].long(), cu_seqlens[-1].long(),
                                    (cu_seqlens.diff() < 0).sum())).tolist()
    if first != 0 or last != tokens or dec:
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to the token count {tokens}, "
                         f"got {cu_seqlens.tolist()}")
