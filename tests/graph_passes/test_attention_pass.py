"""The attention pass on a small hand-written module: HF's own eager_attention_forward (repeat_kv GQA, additive
mask, fp32 softmax casts) and F.scaled_dot_product_attention (native GQA, is_causal, bool mask) become
omni::gqa_attention; near-misses stay: SDPA's top-left is_causal with fewer queries than keys, a softmax over
the wrong dim. One compile per dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniops.testing import assert_close
from tests.graph_passes._util import compile_omni, omni_ops

pytestmark = pytest.mark.compile


class _Module(torch.nn.Module):  # what HF's eager_attention_forward reads from the attention module
    num_key_value_groups = 2

    def __init__(self) -> None:
        super().__init__()
        self.train(False)


def _repeat(t: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def attention_block(q, k, v, q_short, add_mask, bool_mask):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    a = eager_attention_forward(_Module(), q, k, v, add_mask, 0.25)[0]  # -> gqa_attention (transposed back)
    b = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # S == L -> gqa_attention
    c = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, enable_gqa=True)  # -> gqa_attention
    # near-misses: top-left causal with 3 queries over 6 keys; softmax over the query dim
    d = F.scaled_dot_product_attention(q_short, k, v, is_causal=True, enable_gqa=True)
    kr, vr = _repeat(k, 2), _repeat(v, 2)
    e = torch.softmax(q @ kr.transpose(2, 3) * 0.25, dim=-2) @ vr
    return a, b, c, d, e


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_pass(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 4, 16, generator=g).to(dtype).transpose(1, 2)  # HF: [B, S, H, D] viewed [B, H, S, D]
    k, v = (torch.randn(2, 2, 6, 16, generator=g).to(dtype) for _ in range(2))
    q_short = q[:, :, :3]
    add_mask = torch.where(torch.rand(2, 1, 6, 6, generator=g) > 0.3, 0.0, torch.finfo(dtype).min).to(dtype)
    bool_mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    bool_mask[..., 0] = True  # SDPA gives NaN for a row that sees nothing, gqa_attention zeros
    args = (q, k, v, q_short, add_mask, bool_mask)
    _, out, rep = compile_omni(attention_block, *args)
    for o, r in zip(out, attention_block(*args), strict=True):
        assert_close(o, r)
    assert rep.matched["attention"] == 3, rep.format()
    assert omni_ops(rep)["gqa_attention"] == 3
    assert "top-left" in rep.missed["attention"]
