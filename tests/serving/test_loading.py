"""Checkpoints load from either expert layout, single-file or sharded, with clear errors for what is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from omniops.serving import LLM, SamplingParams
from tests.serving.conftest import mixed_prompts

SP = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _tokens(path: str) -> list[list[int]]:
    llm = LLM(path, max_model_len=256, kv_cache_memory=0.02, enforce_eager=True)
    return [o.outputs[0].token_ids for o in llm.generate(mixed_prompts(3, seed=11), SP)]


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_layouts_and_shards_load_the_same_model(arch, checkpoint):
    ref = _tokens(checkpoint(arch))
    assert _tokens(checkpoint(arch, expert_layout="fused")) == ref
    sharded = checkpoint(arch, shards=3)
    assert (Path(sharded) / "model.safetensors.index.json").exists()
    assert _tokens(sharded) == ref


def test_missing_tensor_is_named(checkpoint, tmp_path):
    src = Path(checkpoint("llama"))
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        LLM(str(dst), enforce_eager=True)


def test_unknown_architecture(checkpoint, tmp_path):
    dst = tmp_path / "other"
    shutil.copytree(checkpoint("llama"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        LLM(str(dst), enforce_eager=True)


def test_chat_uses_the_template(checkpoint):
    llm = LLM(checkpoint("qwen3_moe"), max_model_len=256, kv_cache_memory=0.02, enforce_eager=True)
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    out = llm.chat(conv, SP)[0]
    rendered = llm.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert out.prompt == rendered and rendered.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)
    direct = llm.generate([out.prompt_token_ids], SP)[0]
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids
    two = llm.chat([conv, conv[1:]], SP)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_dtype_auto_is_the_checkpoints(checkpoint):
    import torch

    llm = LLM(checkpoint("llama", "bfloat16"), max_model_len=128, kv_cache_memory=0.02, enforce_eager=True)
    assert llm.engine.model.dtype == torch.bfloat16
    assert LLM(checkpoint("llama", "bfloat16"), dtype="float32", max_model_len=128, kv_cache_memory=0.02,
               enforce_eager=True).engine.model.dtype == torch.float32


def test_deepseek_without_q_lora_equals_hf(checkpoint):
    """DeepSeek-V2-Lite style attention (q_proj, no q_lora) and no shared experts."""
    from tests.serving._hf import hf_greedy

    path = checkpoint("deepseek_v3", overrides={"q_lora_rank": None, "n_shared_experts": 0})
    llm = LLM(path, max_model_len=256, kv_cache_memory=0.02, enforce_eager=True)
    assert "q" in llm.engine.model.layers[0] and llm.engine.model.layers[-1]["mlp"].num_shared == 0
    for o in llm.generate(mixed_prompts(3, seed=12), SamplingParams(temperature=0, max_tokens=8)):
        assert o.outputs[0].token_ids == hf_greedy(path, o.prompt_token_ids, 8)
