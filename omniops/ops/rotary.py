"""Rotary position embedding, vLLM's contract.

``positions [*lead]`` (int32/int64), ``q [*lead, Hq*head_size]`` or ``[*lead, Hq, head_size]`` (k likewise,
its own head count, or None), ``cos_sin_cache [max_position, rotary_dim]`` = cat(cos, sin). Rotates the
first ``rotary_dim`` dims of every head: neox pairs the two halves (Llama, Qwen), gpt-j pairs neighbours
(interleaved, as DeepSeek-V3's q_pe/k_pe in its original checkpoint layout).
Partial rotary (rotary_dim < head_size) leaves the rest as is.

Public API: ``rotary_embedding`` (returns new q, k) and ``rotary_embedding_`` (in place, as vLLM's op).
Custom ops: ``omni::rotary_embedding``, ``omni::rotary_embedding_``.
Kernels: ``ascendc/kernels/rotary/rotary_embedding.h`` (cpu), ``omniops/triton/rotary.py``;
oracle ``omniops/reference/rotary.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from omniops._family import OpFamily
from omniops._registry import call, fast_cpu, omni_op
from omniops._validation import FLOAT_DTYPES, check_bool, check_int, check_no_overlap, check_same, check_tensor, is_fake
from omniops.reference import rotary as ref


def _rotary_reference(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor, rotary_dim: int,
                      is_neox: bool, q_out: Tensor, k_out: Tensor) -> None:
    """The backends' form: q, k (and their outputs, which may be q, k) as [tokens, heads, head_size] views with
    unit inner stride, positions int64 [tokens]; no k is a [tokens, 0, head_size] tensor."""
    qn, kn = ref.rotary_embedding(positions, q, k, cos_sin_cache, q.shape[-1], rotary_dim, is_neox)
    q_out.copy_(qn)
    k_out.copy_(kn)


ROTARY = OpFamily("rotary_embedding", _rotary_reference)


def _heads_view(name: str, t: Tensor, lead: int, head_size: int) -> tuple[Tensor, bool]:
    """``t`` as [tokens, heads, head_size]: (a view, True) when the layout allows, else (a copy, False)."""
    if t.dim() == lead + 1:
        if t.shape[-1] % head_size:
            raise ValueError(f"{name}: last dimension {t.shape[-1]} is not a multiple of head_size={head_size}")
        heads = t.shape[-1] // head_size
    elif t.dim() == lead + 2:
        if t.shape[-1] != head_size:
            raise ValueError(f"{name}: expected head dimension {head_size} (head_size), got shape {list(t.shape)}")
        heads = t.shape[-2]
    else:
        raise ValueError(
            f"{name}: expected [*positions.shape, heads*head_size] or [*positions.shape, heads, head_size] "
            f"with positions of {lead} dim(s), got shape {list(t.shape)}"
        )
    tokens = math.prod(t.shape[:lead])
    # Kernels need a unit stride inside a head.
    if head_size == 1 or t.stride(-1) == 1:
        try:
            return t.view(tokens, heads, head_size), True
        except RuntimeError:
            pass
    return t.reshape(tokens, heads, head_size).contiguous(), False


def _validate(positions: Tensor, q: Tensor, k: Tensor | None, cos_sin_cache: Tensor, head_size: int,
              rotary_dim: int, is_neox: bool) -> None:
    check_tensor("positions", positions, dtypes=(torch.int32, torch.int64), min_dim=1)
    check_tensor("q", q, dtypes=FLOAT_DTYPES)
    check_same("q", q, "positions", positions, dtype=False)
    if k is not None:
        check_tensor("k", k)
        check_same("k", k, "q", q)
    check_tensor("cos_sin_cache", cos_sin_cache, dtypes=FLOAT_DTYPES, dim=2)
    check_same("cos_sin_cache", cos_sin_cache, "q", q, dtype=False)
    check_int("head_size", head_size, lo=1)
    if check_int("rotary_dim", rotary_dim) <= 0 or rotary_dim > head_size or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected an even int in [2, head_size={head_size}], got {rotary_dim!r}")
    check_bool("is_neox", is_neox)
    if cos_sin_cache.shape[1] != rotary_dim:
        raise ValueError(
            f"cos_sin_cache: expected [max_position, rotary_dim={rotary_dim}], got shape {list(cos_sin_cache.shape)}"
        )
    lead = positions.dim()
    for name, t in (("q", q), ("k", k)):
        if t is None:
            continue
        if tuple(t.shape[:lead]) != tuple(positions.shape):
            raise ValueError(
                f"{name}: leading dims {list(t.shape[:lead])} must equal positions' shape {list(positions.shape)}"
            )
        _heads_view(name, t, lead, head_size)


def _check_positions(positions: Tensor, max_position: int) -> None:
    """Position values (the C++ entry point checks them itself: only the other paths call this)."""
    if is_fake(positions) or not positions.numel():
        return
    flat = positions.reshape(-1)
    bad = (flat < 0) | (flat >= max_position)
    if bool(bad.any()):  # one pass, one sync
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"positions: entry {i} = {int(flat[i])} is outside [0, {max_position}) "
                         "(the rows of cos_sin_cache)")


def _run(positions: Tensor, q: Tensor, k: Tensor | None, cache: Tensor, head_size: int, rotary_dim: int,
         is_neox: bool, q_out: Tensor, k_out: Tensor | None) -> None:
    lead = positions.dim()
    # reshape(-1) of an expanded positions tensor (one row shared by a batch) can keep a 0 stride
    pos = positions.reshape(-1).to(torch.int64).contiguous()
    q3, _ = _heads_view("q", q, lead, head_size)
    qo3, qo_is_view = _heads_view("q_out", q_out, lead, head_size)
    if k is None:
        k3 = ko3 = q3.new_empty(q3.shape[0], 0, head_size)
        ko_is_view = True
    else:
        k3, _ = _heads_view("k", k, lead, head_size)
        ko3, ko_is_view = _heads_view("k_out", k_out, lead, head_size)
    impl = ROTARY.select(q.device, q.dtype)
    if impl is not ROTARY.cpu_impl() or not (qo_is_view and ko_is_view):  # else the C++ entry point checks these
        _check_positions(positions, cache.shape[0])
        check_no_overlap((("q_out", q_out), ("k_out", k_out)),
                         (("positions", positions), ("q", q), ("k", k), ("cos_sin_cache", cache)),
                         (("q_out", "q"), ("k_out", "k")))
    impl(pos, q3, k3, cache.contiguous(), rotary_dim, is_neox, qo3, ko3)
    # An output layout that cannot be viewed as [tokens, heads, head_size] was computed in a copy.
    if not qo_is_view:
        q_out.copy_(qo3.view(q_out.shape))
    if not ko_is_view:
        k_out.copy_(ko3.view(k_out.shape))


def _fake(positions: Tensor, q: Tensor, k: Tensor | None, cos_sin_cache: Tensor, head_size: int, rotary_dim: int,
          is_neox: bool) -> tuple[Tensor, Tensor]:
    _validate(positions, q, k, cos_sin_cache, head_size, rotary_dim, is_neox)
    return torch.empty_like(q, memory_format=torch.contiguous_format), (
        torch.empty_like(k, memory_format=torch.contiguous_format) if k is not None else q.new_empty(0)
    )


@omni_op("rotary_embedding", fake=_fake)
def _rotary_op(positions: Tensor, q: Tensor, k: Tensor | None, cos_sin_cache: Tensor, head_size: int,
               rotary_dim: int, is_neox: bool) -> tuple[Tensor, Tensor]:
    _validate(positions, q, k, cos_sin_cache, head_size, rotary_dim, is_neox)
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(k, memory_format=torch.contiguous_format) if k is not None else q.new_empty(0)
    if q.numel() or (k is not None and k.numel()):
        _run(positions, q, k, cos_sin_cache, head_size, rotary_dim, is_neox, q_out, k_out if k is not None else None)
    else:
        _check_positions(positions, cos_sin_cache.shape[0])
    return q_out, k_out


def _fake_inplace(positions: Tensor, q: Tensor, k: Tensor | None, cos_sin_cache: Tensor, head_size: int,
                  rotary_dim: int, is_neox: bool) -> None:
    _validate(positions, q, k, cos_sin_cache, head_size, rotary_dim, is_neox)


@omni_op("rotary_embedding_", mutates_args=("q", "k"), fake=_fake_inplace)
def _rotary_inplace_op(positions: Tensor, q: Tensor, k: Tensor | None, cos_sin_cache: Tensor, head_size: int,
                       rotary_dim: int, is_neox: bool) -> None:
    _validate(positions, q, k, cos_sin_cache, head_size, rotary_dim, is_neox)
    # in the public names (C++ would say q_out, k_out)
    check_no_overlap((("q", q), ("k", k)), (("positions", positions), ("cos_sin_cache", cos_sin_cache)))
    if q.numel() or (k is not None and k.numel()):
        _run(positions, q, k, cos_sin_cache, head_size, rotary_dim, is_neox, q, k)
    else:
        _check_positions(positions, cos_sin_cache.shape[0])


def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor | None, cos_sin_cache: Tensor, head_size: int,
                     rotary_dim: int | None = None, is_neox: bool = True) -> tuple[Tensor, Tensor | None]:
    """Apply rotary embedding to q and k; returns new ``(q, k)`` (k None if k is None).

    ``rotary_dim`` defaults to ``cos_sin_cache.shape[1]``. Math in fp32, one rounding per element.
    """
    C = fast_cpu(positions, q, k, cos_sin_cache)
    if (C is not None and isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(positions, Tensor)
            and isinstance(cos_sin_cache, Tensor) and positions.dtype == torch.int64 and positions.dim() == 1
            and q.dim() == 2 and k.dim() == 2 and type(head_size) is int and head_size > 0 and type(is_neox) is bool
            and q.shape[0] > 0 and q.shape[1] % head_size == 0 and k.shape[1] % head_size == 0):
        # The common eager call (a decoder's every layer, [tokens, heads * head_size] rows): straight to C++,
        # which checks the shapes, the positions and the overlap rules itself.
        try:
            T = q.shape[0]
            rd = cos_sin_cache.shape[-1] if rotary_dim is None else rotary_dim
            qo, ko = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
                k, memory_format=torch.contiguous_format)
            ROTARY.cpu_impl()(positions, q.view(T, -1, head_size), k.view(T, -1, head_size), cos_sin_cache, rd,
                              is_neox, qo.view(T, -1, head_size), ko.view(T, -1, head_size))
            return qo, ko
        except (ValueError, TypeError, RuntimeError):
            pass  # the checked path below raises the error of this input (or copies a layout C++ refuses)
    rd = check_tensor("cos_sin_cache", cos_sin_cache).shape[-1] if rotary_dim is None else rotary_dim
    qo, ko = call(_rotary_op, positions, q, k, cos_sin_cache, head_size, rd, is_neox)
    return qo, (ko if k is not None else None)


def rotary_embedding_(positions: Tensor, q: Tensor, k: Tensor | None, cos_sin_cache: Tensor, head_size: int,
                      rotary_dim: int | None = None, is_neox: bool = True) -> tuple[Tensor, Tensor | None]:
    """In-place rotary embedding (vLLM's ``rotary_embedding`` op). Returns ``(q, k)``."""
    rd = check_tensor("cos_sin_cache", cos_sin_cache).shape[-1] if rotary_dim is None else rotary_dim
    call(_rotary_inplace_op, positions, q, k, cos_sin_cache, head_size, rd, is_neox)
    return q, k
