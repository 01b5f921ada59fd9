"""Prefix caching, chunked prefill and preemption change no output; every block is free afterwards."""

from __future__ import annotations

import pytest

from omniops.serving import LLM, SamplingParams
from tests.serving.conftest import FAMILIES, mixed_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _shared_prefix_prompts() -> list[str]:
    system = "you are a helpful assistant who answers briefly and well " * 3
    return [system + p for p in mixed_prompts(6, seed=5, max_words=12)] + mixed_prompts(6, seed=6)


def _run(path: str, prompts: list[str], **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, dtype="float32", max_model_len=512, enforce_eager=True, **{"kv_cache_memory": 0.05, **kw})
    first = llm.generate(prompts[:3], GREEDY)  # fills the prefix cache for the rest
    rest = llm.generate(prompts[3:], GREEDY)
    llm.engine.kv.check_all_free()
    return [o.outputs[0].token_ids for o in first + rest], llm


@pytest.fixture(scope="module", params=FAMILIES)
def baseline(request, checkpoint):
    path = checkpoint(request.param)
    prompts = _shared_prefix_prompts()
    tokens, _ = _run(path, prompts, enable_prefix_caching=False, enable_chunked_prefill=False)
    return path, prompts, tokens


def test_prefix_caching_same_outputs(baseline):
    path, prompts, ref = baseline
    tokens, llm = _run(path, prompts, enable_prefix_caching=True)
    assert tokens == ref
    kv = llm.engine.kv
    assert kv.hits > 0 and kv.hits < kv.queries  # the shared system prompt was served from the cache


def test_chunked_prefill_same_outputs(baseline):
    path, prompts, ref = baseline
    tokens, llm = _run(path, prompts, enable_prefix_caching=False, max_num_batched_tokens=24)
    assert tokens == ref
    assert llm.engine.counters.steps > 20  # the prompts really were split over steps


def test_preemption_same_outputs(baseline):
    path, prompts, ref = baseline
    # ~512 tokens of KV for 12 requests of up to ~230 tokens each: the scheduler must preempt and recompute
    llm = LLM(path, dtype="float32", max_model_len=512, enforce_eager=True, kv_cache_memory=1.0)
    blocks = 512 // 16 + 2
    llm = LLM(path, dtype="float32", max_model_len=512, enforce_eager=True,
              kv_cache_memory=blocks * llm.engine.model.kv_bytes_per_block(16) / 2**30)
    assert llm.engine.kv.num_blocks == blocks
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert llm.engine.scheduler.num_preemptions > 0
    assert any(o.metrics["num_preemptions"] for o in outs)
    llm.engine.kv.check_all_free()
