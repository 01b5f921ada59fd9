"""Bad input raises ValueError / TypeError naming the field, and the engine goes on serving."""

from __future__ import annotations

import pytest

from omniops.serving import LLM, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("qwen3_moe"), dtype="float32", max_model_len=64, kv_cache_memory=0.05, enforce_eager=True)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"n": 2}, "n"),
    ({"logprobs": 99}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"seed": 1.5}, "seed"),
    ({"max_tokens": "8"}, "max_tokens"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_and_the_engine_goes_on(llm):
    eng = llm.engine
    eng.add_request("good", "the fox jumps", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    eng.step()
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("x " * 200)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([[1, 2, 10**6]])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([[1, -3]])
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[]])
    with pytest.raises(TypeError, match="prompt"):
        llm.generate([3.5])
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("good", "again")
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 20
    assert llm.generate("still serving", SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids
    eng.kv.check_all_free()


def test_generation_stops_at_max_model_len(llm):
    out = llm.generate("a b c d", SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 64
    assert out.outputs[0].finish_reason == "length"


def test_abort_frees_blocks(llm):
    eng = llm.engine
    eng.add_request("ab", "abort me please", SamplingParams(max_tokens=30, ignore_eos=True))
    eng.step()
    assert eng.kv.usage() > 0
    assert eng.abort_request("ab") and not eng.abort_request("ab")
    eng.kv.check_all_free()


def test_bad_engine_config(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="model"):
        EngineConfig.from_kwargs(str(tmp_path / "missing"))
    path = checkpoint("llama")
    for kw, field in (({"dtype": "int8"}, "dtype"), ({"block_size": 0}, "block_size"),
                      ({"quantization": "nf4"}, "quantization"), ({"kv_cache_memory": -1}, "kv_cache_memory")):
        with pytest.raises(ValueError, match=field):
            EngineConfig.from_kwargs(path, **kw)
    with pytest.raises(TypeError, match="unknown engine option"):
        EngineConfig.from_kwargs(path, gpu_memory_utilization=0.9)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(path, max_model_len=10**6)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(path, max_model_len=2048, kv_cache_memory=1e-5)
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ValueError, match="not supported"):
        LLM(str(tmp_path))
