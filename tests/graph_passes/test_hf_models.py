"""Unmodified transformers models (small configs, random weights) under torch.compile(backend="omni"):
the omni ops in the compiled graphs (counted), no graph break (fullgraph=True: the MoE block is not split),
prefill logits equal to eager, greedy generation with a DynamicCache gives eager's tokens, and batch /
sequence length marked dynamic compile once.

One compiled model per architecture (module-scoped): its prefill and decode graphs are the two compiles.
Expected counts are per graph (prefill and decode rewrite the same layers).
"""

from __future__ import annotations

import pytest
import torch
from omniops.graph_passes import models as M
from torch._dynamo.utils import counters

from omniops.testing import assert_close
from tests.graph_passes._util import _copy

pytestmark = pytest.mark.compile

STEPS = 3
L = 1  # layers: one is enough to see every pattern (2 norms + residual adds per layer, final norm)


class Compiled:
    def __init__(self, config, dtype: torch.dtype = torch.float32):
        from omniops.graph_passes import report, reset_report

        self.model = M.build(config, dtype)
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, config.vocab_size, (2, 5), generator=g)
        self.eager_logits, self.eager_tokens = M.greedy(self.model, self.model, self.ids.clone(), STEPS, False)
        torch._dynamo.reset()
        reset_report()
        # min_rows=0: rewrite decode-sized norms too (the CPU default leaves them to Inductor), so that every
        # pattern is exercised in both graphs
        self.fn = torch.compile(self.model, backend="omni", fullgraph=True, options={"min_rows": 0})
        graphs0 = counters["stats"]["unique_graphs"]
        self.logits, self.tokens = M.greedy(self.fn, self.model, self.ids.clone(), STEPS)
        self.graphs = counters["stats"]["unique_graphs"] - graphs0
        self.report = _copy(report())


@pytest.fixture(scope="module")
def llama():
    return Compiled(M.llama_config(layers=L))


@pytest.fixture(scope="module")
def qwen3_moe():
    return Compiled(M.qwen3_moe_config(layers=L))


@pytest.fixture(scope="module")
def mixtral():
    return Compiled(M.mixtral_config(layers=L))


@pytest.fixture(scope="module")
def deepseek_v3():
    return Compiled(M.deepseek_v3_config(layers=L, dense_layers=0))


def _check_ops(c: Compiled, per_graph: dict[str, int]) -> None:
    assert c.graphs == 2, "prefill + decode: one compile each, no graph break, no recompile"
    assert c.report.graphs == 2
    expected = {k: 2 * v for k, v in per_graph.items() if v}
    assert dict(c.report.ops) == expected, c.report.format()


def _check_numerics(c: Compiled) -> None:
    assert_close(c.logits, c.eager_logits)
    assert torch.equal(c.tokens, c.eager_tokens)


def test_llama(llama):
    # layer 0's input norm has no residual add before it; every later norm (post-attention, final) has one
    # SDPA (native GQA, is_causal at prefill, no mask at decode) -> gqa_attention
    # linears (q, k, v, o, gate, up, down per layer + lm_head) with <= linear_max_rows rows -> grouped_gemm
    # rotary (on by default): one rotary_embedding per layer for q and k (min_rows=0: the decode graph too)
    _check_ops(llama, {"rms_norm": 1, "fused_add_rms_norm": 2 * L, "gqa_attention": L, "grouped_gemm": 7 * L + 1,
                       "rotary_embedding": L})
    _check_numerics(llama)


def test_llama_dynamic_shapes_no_recompile(llama):
    graphs0 = counters["stats"]["unique_graphs"]
    for b, s in ((3, 7), (2, 11)):
        ids = torch.randint(0, 256, (b, s))
        logits, tokens = M.greedy(llama.fn, llama.model, ids.clone(), 2)
        ref_logits, ref_tokens = M.greedy(llama.model, llama.model, ids.clone(), 2, False)
        assert_close(logits, ref_logits)
        assert torch.equal(tokens, ref_tokens)
    assert counters["stats"]["unique_graphs"] == graphs0, "other batch / sequence / cache lengths recompiled"


def test_qwen3_moe(qwen3_moe):
    # q_norm / k_norm per layer are RMSNorms too; the experts' merged gate_up SiLU-and-mul becomes part of
    # fused_moe when the MoE ops exist
    moe = {"moe_route": L, "fused_moe": L}
    # linears: q, k, v, o and the router per layer, lm_head; rotary: q/k after q_norm / k_norm, one per layer
    _check_ops(qwen3_moe, {"rms_norm": 1 + 2 * L, "fused_add_rms_norm": 2 * L, "gqa_attention": L,
                           "grouped_gemm": 5 * L + 1, "rotary_embedding": L, **moe})
    _check_numerics(qwen3_moe)


def test_mixtral(mixtral):
    # softmax top-k router (renormalised) + grouped_mm experts; linears: q, k, v, o and the router, lm_head
    _check_ops(mixtral, {"rms_norm": 1, "fused_add_rms_norm": 2 * L, "gqa_attention": L, "grouped_gemm": 5 * L + 1,
                         "rotary_embedding": L, "moe_route": L, "fused_moe": L})
    _check_numerics(mixtral)


def test_deepseek_v3(deepseek_v3):
    # q_a_layernorm / kv_a_layernorm per layer; the grouped sigmoid router (sigmoid, correction bias, group
    # top-2 sums, masked top-k) becomes one moe_route per MoE layer, whose int32 ids fused_moe takes
    moe = {"moe_route": L, "fused_moe": L}
    # MLA's q head dim (nope + rope) differs from v's: SDPA takes its math path, decomposed in the graph
    # (q and k^T scaled by sqrt(scale), bmm, additive causal mask, softmax, "safe" zero rows) -> gqa_attention
    # linears: q_a, q_b, kv_a, kv_b, o, router, shared expert's gate, up, down per layer, lm_head
    _check_ops(deepseek_v3, {"rms_norm": 1 + 2 * L, "fused_add_rms_norm": 2 * L, "gqa_attention": L,
                             "grouped_gemm": 9 * L + 1, **moe})
    assert deepseek_v3.report.matched["moe_route"] == 2 * L and "moe_route" not in deepseek_v3.report.missed
    _check_numerics(deepseek_v3)


def test_deepseek_v3_bf16():
    """bf16: the experts' SiLU runs in fp32 between casts and grouped_mm is aten._grouped_mm — still one
    fused_moe; every linear becomes grouped_gemm on CPUs without native bf16 matmul."""
    c = Compiled(M.deepseek_v3_config(layers=L, dense_layers=0), torch.bfloat16)
    assert c.graphs == 2
    ops = c.report.ops
    assert ops["fused_moe"] == 2 * L and ops["moe_route"] == 2 * L and ops["gqa_attention"] == 2 * L, c.report.format()
    assert "fused_moe" not in c.report.missed
    assert_close(c.logits, c.eager_logits)
    assert torch.equal(c.tokens, c.eager_tokens)


# ---- prepare(): the registry route ---------------------------------------------------------------------------
def test_prepare_switches_implementations_eager():
    """Eager: prefill and greedy decode steps after prepare() equal HF's own (the decode steps run the
    weight-absorbed MLA over the latent cache, prefill HF's expanded form)."""
    from omniops.graph_passes import prepare

    model = M.build(M.deepseek_v3_config(layers=2, dense_layers=1))
    ids = torch.randint(0, 256, (2, 6))
    ref_logits, ref_tokens = M.greedy(model, model, ids.clone(), 4, False)
    with torch.no_grad():
        ref_step = _decode_logits(model, ids)
    info = prepare(model)
    logits, tokens = M.greedy(model, model, ids.clone(), 4, False)
    with torch.no_grad():
        step = _decode_logits(model, ids)
    assert info["attention"] and model.config._attn_implementation == "omni" and info["mla_absorbed"] == 2
    assert info["experts"] == 1 and info["routers"] == 1 and model.config._experts_implementation == "omni"
    assert_close(logits, ref_logits, scale=2)
    assert_close(step, ref_step, scale=2)
    assert torch.equal(tokens, ref_tokens)


def _decode_logits(model, ids):
    """Logits of one decode step after a prefill of ``ids`` (the absorbed path)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True)
    return model(input_ids=ids[:, :1], cache=cache, use_cache=True).logits


def test_prepare_then_compile_deepseek_v3():
    """prepare() then backend="omni", fullgraph: prefill and the weight-absorbed MLA decode compile without
    graph breaks (two graphs) and generate eager's tokens."""
    from omniops.graph_passes import prepare, report, reset_report

    model = M.build(M.deepseek_v3_config(layers=L, dense_layers=0))
    ids = torch.randint(0, 256, (2, 5))
    ref_logits, ref_tokens = M.greedy(model, model, ids.clone(), STEPS, False)
    prepare(model)
    torch._dynamo.reset()
    reset_report()
    graphs0 = counters["stats"]["unique_graphs"]
    fn = torch.compile(model, backend="omni", fullgraph=True, options={"min_rows": 0})
    logits, tokens = M.greedy(fn, model, ids.clone(), STEPS)
    assert counters["stats"]["unique_graphs"] - graphs0 == 2
    ops = report().ops
    # attention: the "omni" AttentionInterface (prefill) and the absorbed MLA (decode) call gqa_attention
    assert ops["moe_route"] == 2 * L and ops["fused_moe"] == 2 * L and ops["gqa_attention"] == 2 * L, \
        report().format()
    assert_close(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
