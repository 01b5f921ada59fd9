"""The MoE pass (graph_passes/moe.py: routers, then HF's grouped_mm experts -> fused_moe) on HF's own Qwen3-MoE,
Mixtral and DeepSeek-V3 blocks: matched counts, omni ops in the graph, int32 ids without a cast, output equal to
eager."""

from __future__ import annotations

import operator

import pytest
import torch

from omniops.testing import assert_close
from tests.graph_passes._util import compile_omni

pytestmark = pytest.mark.compile

E, H = 16, 32  # DeepSeek-V3 block: routed experts, hidden size


def _hf_block(block_cls, cfg):
    """An HF MoE block on its grouped_mm experts, weights ~ N(0, 0.1) from seed 0."""
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    m = block_cls(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def _qwen_moe_block(norm_topk_prob=True):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return _hf_block(Qwen3MoeSparseMoeBlock, Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8,
                                                            num_experts_per_tok=2, norm_topk_prob=norm_topk_prob))


def _mixtral_moe_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    return _hf_block(MixtralSparseMoeBlock, MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=8,
                                                          num_experts_per_tok=2))


@pytest.mark.parametrize("block", ["qwen3_moe", "qwen3_moe_no_renorm", "mixtral"])
def test_moe_block_to_fused_moe(block):
    m = _mixtral_moe_block() if block == "mixtral" else _qwen_moe_block(block == "qwen3_moe")
    x = torch.randn(2, 5, 32)
    _, out, rep = compile_omni(m, x, fullgraph=True)
    assert rep.matched["moe_route"] == 1 and rep.matched["fused_moe"] == 1, rep
    assert rep.ops["fused_moe"] == 1 and rep.ops["moe_route"] == 1
    with torch.no_grad():
        assert_close(out, m(x))


def test_deepseek_v3_moe_block_route_and_experts(monkeypatch):
    # HF's own DeepseekV3MoE block with grouped_mm experts: moe_route, then fused_moe reading its int32 ids
    from omniops.graph_passes import moe
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    m = _hf_block(DeepseekV3MoE, DeepseekV3Config(hidden_size=H, moe_intermediate_size=16, n_routed_experts=E,
                                                  num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                                                  routed_scaling_factor=2.5))
    with torch.no_grad():
        m.gate.e_score_correction_bias.uniform_(-0.1, 0.1)

    ids_dtypes = []
    pass_ = moe.moe_pass

    def spy(graph, rep, cfg):
        pass_(graph, rep, cfg)
        for n in graph.nodes:
            if n.op == "call_function" and str(n.target).startswith("omni.fused_moe"):
                ids = n.args[[a.name for a in n.target._schema.arguments].index("topk_ids")]
                ids_dtypes.append((ids.meta["val"].dtype, ids.target is operator.getitem
                                   and str(ids.args[0].target).startswith("omni.moe_route")))

    monkeypatch.setattr(moe, "moe_pass", spy)
    x = torch.randn(2, 5, H)
    _, out, rep = compile_omni(m, x, fullgraph=True)
    assert rep.matched["moe_route"] == 1 and rep.matched["fused_moe"] == 1, rep
    assert ids_dtypes == [(torch.int32, True)], "fused_moe takes moe_route's int32 ids, no cast"
    with torch.no_grad():
        assert_close(out, m(x))
