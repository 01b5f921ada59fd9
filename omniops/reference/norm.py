"""RMSNorm oracle, in HF LlamaRMSNorm's formulation (fp32 statistics, cast to x's dtype before the weight)."""

from __future__ import annotations

import torch


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * (s / sqrt(mean(s^2) + eps))`` with ``s = x`` or ``s = x + residual`` (rounded to x.dtype).

    With a residual returns ``(normed, s)``: the fused add + norm of pre-norm decoder layers.
    """
    s = x if residual is None else x + residual
    sf = s.float()
    var = sf.pow(2).mean(-1, keepdim=True)
    out = weight * (sf * torch.rsqrt(var + eps)).to(x.dtype)
    return out if residual is None else (out, s)
