"""Each omni pass on small hand-written modules: what it matches (counts), that the result equals eager, and
near-misses it must leave alone. One compile per dtype for the norm/activation passes (Inductor is slow here)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from omniops.testing import assert_close
from tests.graph_passes._util import compile_omni, omni_ops

pytestmark = pytest.mark.compile


def hf_rms(x, w, eps):
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def block(x, res, w, w32, gu, gu2):
    s = res + x
    a = hf_rms(s, w, 1e-5)  # residual add + RMSNorm -> fused_add_rms_norm
    b = hf_rms(a, w, 1e-6)  # RMSNorm -> rms_norm
    gate, up = gu.chunk(2, dim=-1)
    c = F.silu(gate) * up  # merged SiLU-and-mul -> silu_and_mul
    # near-misses: RMSNorm without epsilon; a different activation; weight in another dtype than x
    h = b.float()
    d = (w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True))).to(b.dtype))
    g2, u2 = gu2.chunk(2, dim=-1)
    e = F.gelu(g2) * u2
    f = hf_rms(b, w32, 1e-6).to(b.dtype) if x.dtype != torch.float32 else b
    return a, b, c, d, e, f, s * 2


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x, res = (torch.randn(3, 24, 64, generator=g).to(dtype) for _ in range(2))  # 72 rows >= min_rows
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
    gu, gu2 = (torch.randn(3, 24, 96, generator=g).to(dtype) for _ in range(2))
    return x, res, w, w.float(), gu, gu2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_activation_passes(dtype):
    args = _inputs(dtype)
    _, out, rep = compile_omni(block, *args)
    ref = block(*args)
    for o, r in zip(out, ref, strict=True):
        assert_close(o, r)
    assert rep.matched["fused_add_rms_norm"] == 1
    assert rep.matched["rms_norm"] == 1
    assert rep.matched["silu_and_mul"] == 1
    ops = omni_ops(rep)
    assert ops["fused_add_rms_norm"] == 1 and ops["rms_norm"] == 1 and ops["silu_and_mul"] == 1, ops
    # the near-misses stay as they are, and the report says so
    assert "rms_norm" in rep.missed


def test_passes_switch_off(capsys):
    args = _inputs(torch.float32)
    _, out, rep = compile_omni(block, *args, options={"rms_norm": False, "fused_add_rms_norm": False,
                                                      "silu_and_mul": False, "log": True})
    assert sum(rep.matched.values()) == 0 and not rep.ops
    for o, r in zip(out, block(*args), strict=True):
        assert_close(o, r)
    assert "switched off" in rep.missed["rms_norm"]
    assert "omni passes: 1 graph(s) rewritten" in capsys.readouterr().out  # log=True (or OMNI_LOG=passes)


def test_backend_registered_without_importing_omniops():
    code = ("import torch\n"
            "from torch._dynamo.backends.registry import lookup_backend\n"
            "import sys\n"
            "assert 'omniops' not in sys.modules\n"
            "fn = lookup_backend('omni')\n"
            "print(fn.__module__, fn.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["omniops.graph_passes.backend", "omni_backend"]


def test_pass_uuid_tracks_config():
    from omniops.graph_passes import OmniGraphPass, PassConfig

    a, b = OmniGraphPass(PassConfig()), OmniGraphPass(PassConfig(rms_norm=False))
    assert a.uuid() == OmniGraphPass(PassConfig()).uuid() != b.uuid()


def test_min_rows_leaves_decode_sized_norms_to_inductor():
    # 3 x 5 = 15 rows: below the default min_rows (64) on CPU, so nothing is rewritten; min_rows=0 rewrites
    g = torch.Generator().manual_seed(2)
    x, res, w = torch.randn(3, 5, 64, generator=g), torch.randn(3, 5, 64, generator=g), torch.randn(64, generator=g)

    def f(x, res, w):
        s = res + x
        return hf_rms(s, w, 1e-6), s

    _, out, rep = compile_omni(f, x, res, w)
    assert not rep.ops and "min_rows=64" in rep.missed["rms_norm"]
    _, out0, rep0 = compile_omni(f, x, res, w, options={"min_rows": 0})
    assert rep0.ops["fused_add_rms_norm"] == 1
    for a, b, r in zip(out, out0, f(x, res, w), strict=True):
        assert_close(a, r)
        assert_close(b, r)


def test_unknown_option_rejected():
    with pytest.raises(Exception, match="unknown option"):
        compile_omni(lambda x: x + 1, torch.ones(2), options={"no_such_pass": True})


def split_mlp(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def split_near_miss(x, wg, wu, wd):
    return F.linear(F.relu(F.linear(x, wg)) * F.linear(x, wu), wd)


def test_silu_and_mul_split_form():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 32, generator=g)
    wg, wu, wd = torch.randn(48, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(32, 48, generator=g)
    _, out, rep = compile_omni(split_mlp, x, wg, wu, wd, options={"silu_and_mul_split": True})
    assert rep.matched["silu_and_mul_split"] == 1 and rep.ops["silu_and_mul"] == 1
    assert_close(out, split_mlp(x, wg, wu, wd), scale=4)
    _, out, rep = compile_omni(split_near_miss, x, wg, wu, wd, options={"silu_and_mul_split": True})
    assert rep.matched["silu_and_mul_split"] == 0 and not rep.ops
    assert_close(out, split_near_miss(x, wg, wu, wd), scale=4)


# ---- MoE: router top-k and HF's grouped_mm experts, on HF's own Qwen3-MoE block ------------------------------
def _qwen_moe_block(norm_topk_prob=True):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=norm_topk_prob)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    m = Qwen3MoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def _mixtral_moe_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    m = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("block", ["qwen3_moe", "qwen3_moe_no_renorm", "mixtral"])
def test_moe_block_to_fused_moe(block):
    m = _mixtral_moe_block() if block == "mixtral" else _qwen_moe_block(block == "qwen3_moe")
    x = torch.randn(2, 5, 32)
    _, out, rep = compile_omni(m, x, fullgraph=True)
    assert rep.matched["moe_route"] == 1 and rep.matched["fused_moe"] == 1, rep
    assert rep.ops["fused_moe"] == 1 and rep.ops["moe_route"] == 1
    with torch.no_grad():
        assert_close(out, m(x))


def test_moe_near_miss_sigmoid_router_not_matched():
    # a sigmoid top-k is not a softmax router: left alone
    def f(logits):
        return torch.topk(torch.sigmoid(logits), 2, dim=-1)

    logits = torch.randn(5, 8)
    _, (v, i), rep = compile_omni(f, logits)
    assert rep.matched["moe_route"] == 0
    rv, ri = f(logits)
    assert torch.equal(i, ri)
    assert_close(v, rv)


def test_prepare_hint_said_once():
    import logging

    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)
    from omniops.graph_passes import backend

    g = torch.fx.Graph()
    x, w, offs = g.placeholder("x"), g.placeholder("w"), g.placeholder("offs")
    g.output(g.call_function(torch.ops.transformers.grouped_mm_fallback.default, (x, w, offs)))
    gm = torch.fx.GraphModule({}, g)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    backend.log.addHandler(handler)
    try:
        backend._HINTED = False
        backend._hint_prepare(gm)
        backend._hint_prepare(gm)
    finally:
        backend.log.removeHandler(handler)
    assert sum("prepare(model)" in m for m in seen) == 1
