"""Tensors for the fuzz suite: every tensor lives inside a sentinel-filled buffer, so a write outside it shows.

``padded(...)`` makes a tensor whose storage has PAD_BYTES of a known byte pattern on both sides; ``place(t)``
copies any strided tensor (stride-0 views too) into such a buffer; ``pads_intact()`` says which buffers had
their padding overwritten since they were made. The registry is per case (``reset()``).
"""

from __future__ import annotations

import math

import torch

PAD_BYTES = 256
_PATTERN = 0xA5
_BUFFERS: list[tuple[torch.Tensor, int, int]] = []  # (uint8 buffer, pad bytes, body bytes)
_STORAGES: set[int] = set()


def reset() -> None:
    _BUFFERS.clear()
    _STORAGES.clear()


def _buffer(body_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = torch.full((body_bytes + 2 * PAD_BYTES,), _PATTERN, dtype=torch.uint8)
    _BUFFERS.append((buf, PAD_BYTES, body_bytes))
    _STORAGES.add(buf.untyped_storage().data_ptr())
    return buf, buf[PAD_BYTES:PAD_BYTES + body_bytes]


def registered(t: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() in _STORAGES


def strided_empty(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor of these sizes and (non-negative) strides inside a padded buffer."""
    es = torch.empty((), dtype=dtype).element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) if all(shape) else 0
    _, body = _buffer(max(extent, 1) * es)
    return body.view(dtype).as_strided(shape, stride)


def padded(shape: tuple[int, ...] | list[int], dtype: torch.dtype = torch.float32, fill: str | float = "randn",
           gen: torch.Generator | None = None) -> torch.Tensor:
    """A contiguous tensor in a padded buffer: random normal ("randn"), zeros, or a constant."""
    shape = tuple(shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    t = strided_empty(shape, stride, dtype)
    if fill == "randn":
        t.copy_(torch.randn(shape, generator=gen).to(dtype))
    elif fill == "zeros":
        t.zero_()
    else:
        t.fill_(fill)
    return t


def place(t: object) -> object:
    """A copy of tensor ``t`` with its sizes and strides inside a padded buffer (stride-0 dims stay stride 0,
    so a huge broadcast view stays cheap). Non-tensors and tensors this module made are returned as they are."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.layout != torch.strided or registered(t):
        return t
    if any(s < 0 for s in t.stride()) or t.is_neg() or t.is_conj():
        return t
    zero = [n > 1 and s == 0 for n, s in zip(t.shape, t.stride(), strict=True)]
    compact = t[tuple(slice(0, 1) if z else slice(None) for z in zero)]
    dst = strided_empty(tuple(compact.shape), tuple(compact.stride()), t.dtype)
    if compact.numel():
        dst.copy_(compact)
    return dst.expand(t.shape) if any(zero) else dst


def pads_intact() -> list[str]:
    """Descriptions of the buffers whose padding was written (out-of-bounds writes)."""
    bad = []
    for buf, pad, body in _BUFFERS:
        head, tail = buf[:pad], buf[pad + body:]
        if bool((head != _PATTERN).any()) or bool((tail != _PATTERN).any()):
            where = "before" if bool((head != _PATTERN).any()) else "after"
            bad.append(f"bytes written {where} a {body}-byte tensor")
    return bad
