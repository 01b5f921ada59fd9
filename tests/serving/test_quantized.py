"""``quantization=`` quantizes linears and experts at load with the project's formats; outputs stay close."""

from __future__ import annotations

import pytest
import torch

from omniops.serving import LLM
from omniops.serving.sampling_params import SamplingParams
from tests.serving.conftest import mixed_prompts

# min cosine similarity of the last-position logits to the float model's, per scheme (random tiny models)
MIN_COSINE = {"w8a8": 0.99, "fp8_block": 0.97, "w4a16": 0.85}


def prefill_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    eng = llm.engine
    req = eng.add_request("logits", ids, SamplingParams(max_tokens=1))
    input_ids, meta, _, last = eng.runner.prepare(eng.scheduler.schedule())
    out = eng.runner.execute(input_ids, meta, last)[0]
    eng.abort_request(req.request_id)
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("scheme", sorted(MIN_COSINE))
def test_quantized_close_to_float(arch, scheme, checkpoint):
    path = checkpoint(arch)
    ref = LLM(path, max_model_len=256, enforce_eager=True, kv_cache_memory=0.02)
    q = LLM(path, max_model_len=256, enforce_eager=True, kv_cache_memory=0.02, quantization=scheme)
    layer = q.engine.model.layers[-1]
    assert layer["o"].quant is not None and layer["o"].weight is None  # really stored quantized
    assert layer["mlp"].quant is not None and layer["mlp"].w13 is None
    for prompt in mixed_prompts(4, seed=8):
        ids = ref.engine.encode(prompt)
        a, b = prefill_logits(ref, ids), prefill_logits(q, ids)
        assert torch.cosine_similarity(a, b, dim=0) >= MIN_COSINE[scheme]
    out = q.generate(mixed_prompts(3, seed=9), SamplingParams(max_tokens=5, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 5 for o in out)
    q.engine.kv.check_all_free()
