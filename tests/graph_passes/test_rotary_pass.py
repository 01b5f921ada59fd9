"""The ``rotary`` pass: HF's apply_rotary_pos_emb (q * cos + rotate_half(q) * sin, k likewise) on a small
GQA attention module (4 q heads, 2 kv heads, head 16) -> one omni::rotary_embedding per q/k pair; near misses
(rotate_half with the halves the wrong way, other angles for k, cos/sin not built from cat((f, f))) and
decode-sized graphs under the CPU min_rows guard stay Inductor's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omniops.testing import assert_close
from tests.graph_passes._util import compile_omni

pytestmark = pytest.mark.compile

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

HIDDEN, HEADS, KV, HD = 64, 4, 2, 16


def _wrong_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((x2, -x1), dim=-1)  # HF's is cat((-x2, x1)): the other rotation direction


class Attn(nn.Module):
    """Llama's attention block, with HF's own rotary module and apply_rotary_pos_emb (``variant``: a near miss)."""

    def __init__(self, variant: str = "hf") -> None:
        super().__init__()
        from omniops.graph_passes.models import llama_config

        self.variant = variant
        self.q = nn.Linear(HIDDEN, HEADS * HD, bias=False)
        self.k = nn.Linear(HIDDEN, KV * HD, bias=False)
        self.v = nn.Linear(HIDDEN, KV * HD, bias=False)
        self.o = nn.Linear(HEADS * HD, HIDDEN, bias=False)
        self.rope = LlamaRotaryEmbedding(llama_config(hidden=HIDDEN, heads=HEADS, kv_heads=KV))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, HD).transpose(1, 2)
        k = self.k(x).view(b, s, -1, HD).transpose(1, 2)
        v = self.v(x).view(b, s, -1, HD).transpose(1, 2)
        cos, sin = self.rope(x, pos)
        if self.variant == "hf":
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        elif self.variant == "wrong_rotate_half":
            c, s_ = cos.unsqueeze(1), sin.unsqueeze(1)
            q, k = q * c + _wrong_rotate_half(q) * s_, k * c + _wrong_rotate_half(k) * s_
        elif self.variant == "other_angles_for_k":
            cos2, sin2 = self.rope(x, pos + 3)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            k, _ = apply_rotary_pos_emb(k, k, cos2, sin2)
        elif self.variant == "halves_differ":
            # cos/sin whose two halves differ (not cat((freqs, freqs))): the op would drop the second half
            freqs = pos[..., None].float() * self.rope.inv_freq
            emb = torch.cat((freqs, 2 * freqs), dim=-1)
            q, k = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(o.transpose(1, 2).reshape(b, s, -1))


def _inputs(b: int = 2, s: int = 8, batch_pos: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, HIDDEN, generator=g)
    pos = torch.arange(s)[None] + 2
    return x, (pos.expand(b, s).contiguous() if batch_pos else pos)


def _run(variant: str, inputs, options: dict):
    torch.manual_seed(0)
    m = Attn(variant).eval()
    with torch.no_grad():
        ref = m(*inputs)
    _, out, rep = compile_omni(m, *inputs, options=options, fullgraph=True)
    return out, ref, rep


ON = {"rotary": True, "min_rows": 0}


@pytest.mark.parametrize("batch_pos", [False, True], ids=["cos_1xSxD", "cos_BxSxD"])
def test_rotary_rewritten(batch_pos):
    # cos [1, S, D] (HF's default position_ids) and [B, S, D] (explicit per-sequence positions)
    out, ref, rep = _run("hf", _inputs(batch_pos=batch_pos), ON)
    assert rep.matched["rotary"] == 1 and rep.ops["rotary_embedding"] == 1, rep.format()
    assert "rotary" not in rep.missed
    assert_close(out, ref)


@pytest.mark.parametrize("variant", ["wrong_rotate_half", "other_angles_for_k", "halves_differ"])
def test_rotary_near_miss_not_rewritten(variant):
    out, ref, rep = _run(variant, _inputs(), ON)
    assert rep.matched["rotary"] == 0 and rep.ops["rotary_embedding"] == 0, rep.format()
    assert_close(out, ref)
    if variant != "wrong_rotate_half":  # a rotate_half of HF's form is left: the report says why
        assert "rotary" in rep.missed, rep.format()


def test_rotary_min_rows_guard():
    # 2 x 4 tokens < the default min_rows: decode-sized rotary stays Inductor's fused loop on CPU
    out, ref, rep = _run("hf", _inputs(b=2, s=4), {"rotary": True})
    assert rep.ops["rotary_embedding"] == 0, rep.format()
    assert "min_rows" in rep.missed["rotary"]
    assert_close(out, ref)
