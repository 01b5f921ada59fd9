"""Rotary embedding oracle (vLLM's layout: cos_sin_cache rows are cat(cos, sin) of rotary_dim/2 each)."""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate ``x [..., rotary_dim]`` (fp32) by cos/sin ``[..., rotary_dim/2]`` broadcast over heads."""
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    rotary_dim: int,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q ``[T, Hq*head_size]`` or ``[T, Hq, head_size]`` (k likewise); returns new tensors of the same shapes."""
    tokens, lead = positions.numel(), positions.dim()
    cs = cos_sin_cache.float()[positions.reshape(-1).long()]  # [T, rotary_dim]
    cos, sin = cs.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def apply(t: torch.Tensor) -> torch.Tensor:
        shape = t.shape
        heads = shape[-1] // head_size if t.dim() == lead + 1 else shape[-2]
        th = t.reshape(tokens, heads, head_size).float()
        rot = rotate(th[..., :rotary_dim], cos, sin, is_neox)
        return torch.cat((rot, th[..., rotary_dim:]), dim=-1).to(t.dtype).reshape(shape)

    return apply(q), (apply(k) if k is not None else None)
