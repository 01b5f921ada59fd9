"""Attention over contiguous K/V (SDPA layout) on the paged Triton kernels of ``omniops/triton/attention.py``.

Sequence b's keys are one "block" of L slots (block_table[b] = b), so no key is copied: S == 1 runs the split-KV
decode over the batch; S > 1 runs the prefill once per sequence with the first L - S keys as the cached prefix
and the last S as the new tokens (bottom-right causal). The same scheme as the C++ ``dense_attention``; the
kernels take no mask, so calls with ``attn_mask`` are not served here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from omniops.ops.gqa_attention import GQA_ATTENTION
from omniops.triton.attention import gqa_decode_forward, gqa_prefill_forward


def _no_mask(out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, *_: object) -> str | None:
    return None if attn_mask is None else "attn_mask is not supported by the triton kernels (causal and no mask only)"


@GQA_ATTENTION.impl("triton", supports=_no_mask)
def gqa_attention_forward(out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, causal: bool,
                          scale: float) -> None:
    """out [B, Hq, S, Dv]; q [B, Hq, S, D], k / v [B, Hk, L, *] with unit inner strides; no mask."""
    B, hq, S, _ = q.shape
    L = k.shape[2]
    i32 = dict(dtype=torch.int32, device=q.device)
    kc, vc = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # [B, L, Hk, *]: B blocks of L slots
    if S == 1:
        table = torch.arange(B, **i32)[:, None]
        gqa_decode_forward(out[:, :, 0], q[:, :, 0], kc, vc, table, torch.full((B,), L, **i32), scale, None, None)
        return
    table, ctx, cu = torch.zeros(1, 1, **i32), torch.full((1,), L - S, **i32), torch.tensor([0, S], **i32)
    for b in range(B):
        gqa_prefill_forward(out[b].transpose(0, 1), q[b].transpose(0, 1), k[b, :, L - S:].transpose(0, 1),
                            v[b, :, L - S:].transpose(0, 1), cu, causal, scale, kc[b:b + 1], vc[b:b + 1], table, ctx)
