"""Greedy generation equals Hugging Face's ``generate`` token for token (float32), for every family, at batch 1
and as 32 mixed-length requests sharing the batch stream; bf16 agreement rates against HF."""

from __future__ import annotations

import pytest
import torch

from omniops.serving import LLM, SamplingParams
from tests.serving._hf import hf_greedy, hf_logits
from tests.serving.conftest import FAMILIES, mixed_prompts

NEW_TOKENS = 12


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, checkpoint):
    path = checkpoint(request.param)
    return path, LLM(path, dtype="float32", max_model_len=512, enforce_eager=True, kv_cache_memory=0.05)


def test_batch1_equals_hf(family):
    path, llm = family
    for prompt in mixed_prompts(3, seed=1):
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))[0]
        assert out.outputs[0].token_ids == hf_greedy(path, out.prompt_token_ids, NEW_TOKENS)
    llm.engine.kv.check_all_free()


def test_32_mixed_requests_equal_hf(family):
    path, llm = family
    prompts = mixed_prompts(32, seed=2)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    lengths = {len(o.prompt_token_ids) for o in outs}
    assert len(lengths) > 10  # really mixed
    for o in outs:
        assert o.outputs[0].token_ids == hf_greedy(path, o.prompt_token_ids, NEW_TOKENS), o.prompt
    assert llm.engine.counters.steps < 32 * NEW_TOKENS  # requests shared steps
    llm.engine.kv.check_all_free()


@pytest.mark.parametrize("arch", FAMILIES)
def test_bf16_agreement(arch, checkpoint):
    """bf16: teacher-forced top-1 agreement with HF in bf16 >= 99%, and the first 8 greedy tokens equal on most
    prompts. Random tiny models have near-flat next-token distributions, so bf16 rounding alone flips some
    choices: HF's own float32 forward agrees with HF's bf16 one only that often (the noise floor, measured in the
    same test). Where that floor is under 99% we must reach it (within one point) instead. Rates: bench/RESULTS.md.
    """
    path = checkpoint(arch, "bfloat16")
    llm = LLM(path, dtype="bfloat16", max_model_len=512, enforce_eager=True, kv_cache_memory=0.05)
    outs = llm.generate(mixed_prompts(16, seed=3), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    agree = floor = total = first8 = 0
    for o in outs:
        ours, n = o.outputs[0].token_ids, len(o.prompt_token_ids)
        seq = o.prompt_token_ids + ours
        hf16 = hf_logits(path, seq, torch.bfloat16)[n - 1:-1].argmax(-1).tolist()  # HF's choice fed our tokens
        hf32 = hf_logits(path, seq, torch.float32)[n - 1:-1].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(hf16, ours, strict=True))
        floor += sum(a == b for a, b in zip(hf16, hf32, strict=True))
        total += len(ours)
        first8 += hf16[:8] == ours[:8]
    print(f"{arch} bf16: top-1 agreement {agree}/{total} (HF fp32 vs HF bf16: {floor}/{total}), "
          f"first 8 tokens equal on {first8}/{len(outs)} prompts")
    assert agree / total >= min(0.99, floor / total - 0.01), (agree, floor, total)
    assert first8 >= 12, first8
