"""Expert parallelism with quantized experts (gloo, one machine): --ep 2 / 4 with --quantization give the greedy
tokens of --ep 1 with the same quantization, with redundant copies moved live (weights and scales together)."""

from __future__ import annotations

import pytest
import torch

from omniops.serving import SamplingParams
from tests.serving.conftest import mixed_prompts
from tests.serving.test_ep_engine import _generate, _skewed

PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
E = 8


@pytest.mark.parametrize("arch,scheme,ep,redundant,nodes", [
    ("qwen3_moe", "w8a8", 2, 2, 1),
    ("deepseek_v3", "w8a8", 4, 4, 2),
    ("qwen3_moe", "fp8_block", 2, 2, 1),
    ("deepseek_v3", "w4a16", 2, 2, 1),
])
def test_quantized_ep_equals_ep1(checkpoint, arch, scheme, ep, redundant, nodes):
    path = checkpoint(arch)
    groups = 4 if arch == "deepseek_v3" else 1
    # skewed prompts, so that the dynamic placement really moves quantized slots between ranks
    prompts = _skewed(path, ep, redundant, groups, nodes) + mixed_prompts(2, seed=5, max_words=20)
    ref, _ = _generate(path, prompts, PARAMS, quantization=scheme)
    tokens, llm = _generate(path, prompts, PARAMS, quantization=scheme, ep=ep, redundant_experts=redundant,
                            placement="dynamic", placement_interval=3, placement_nodes=nodes)
    assert tokens == ref
    s = llm.engine.ep.stats
    assert s.updates >= 1 and s.moved >= 1  # slots' quantized weights and scales were copied rank to rank
    for m in llm.engine.ep.loop.layers:
        assert m.w13 is None and m.quant is not None and m.quant.scheme == m.quant.linears[0][1].scheme
        assert all(t.shape[0] == (E + redundant) // ep for t in m.quant.tensors)  # only this rank's slots
        assert any(t.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn) for t in m.quant.tensors)
        assert any(t.dtype == torch.float32 for t in m.quant.tensors)  # the scales travel with the weights
