"""omniops: operators and graph passes for serving large Mixture-of-Experts LLMs.

Ops are ``torch.library`` custom ops in the ``omni`` namespace with three backends (``reference`` pure torch,
``cpu`` the AscendC-style C++ kernels in ``omniops._C``, ``triton``); see ``use_backend``.
"""

from __future__ import annotations

from omniops._backends import BACKENDS, BackendError, use_backend
from omniops._cpu import cpu_info
from omniops.ops.activation import silu_and_mul
from omniops.ops.attention import gqa_decode, gqa_prefill, mla_cache, mla_decode, reshape_and_cache
from omniops.ops.norm import rms_norm, rms_norm_
from omniops.ops.rotary import rotary_embedding, rotary_embedding_

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "cpu_info",
    "gqa_decode",
    "gqa_prefill",
    "mla_cache",
    "mla_decode",
    "reshape_and_cache",
    "rms_norm",
    "rms_norm_",
    "rotary_embedding",
    "rotary_embedding_",
    "silu_and_mul",
    "use_backend",
]
