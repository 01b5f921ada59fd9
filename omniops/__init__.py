"""omniops: operators and graph passes for serving large Mixture-of-Experts LLMs.

Ops are ``torch.library`` custom ops in the ``omni`` namespace with three backends (``reference`` pure torch,
``cpu`` the AscendC-style C++ kernels in ``omniops._C``, ``triton``); see ``use_backend``. The rest of the API are
helpers (plain functions, no backend): ``quantize_*`` / ``dequantize_weight``, ``prepack_*``, ``cpu_info``,
``available_backends``, and the ``QuantLinear`` / ``MoEDispatch`` types.
"""

from __future__ import annotations

from omniops._backends import BACKENDS, BackendError, available_backends, use_backend
from omniops._cpu import cpu_info, get_kernel_threads, set_kernel_threads
from omniops.ops.activation import silu_and_mul
from omniops.ops.attention import gqa_decode, gqa_prefill, mla_decode
from omniops.ops.cache_ops import mla_cache, reshape_and_cache
from omniops.ops.gqa_attention import gqa_attention
from omniops.ops.moe import MoEDispatch, fused_moe, grouped_gemm, moe_combine, moe_dispatch, moe_route
from omniops.ops.norm import rms_norm, rms_norm_
from omniops.ops.prepack import prepack_linear_weight, prepack_moe_weights
from omniops.ops.quant_gemm import fp8_block_gemm, w4a16_gemm, w8a8_gemm
from omniops.ops.quant_linear import fp8_block_linear, w8a8_linear
from omniops.ops.rotary import rotary_embedding, rotary_embedding_
from omniops.quant import (
    QuantLinear,
    dequantize_weight,
    quantize_activation_fp8_group,
    quantize_activation_per_token_int8,
    quantize_model,
    quantize_weight,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BACKENDS",
    "available_backends",
    "cpu_info",
    "dequantize_weight",
    "fp8_block_gemm",
    "fp8_block_linear",
    "fused_moe",
    "get_kernel_threads",
    "gqa_decode",
    "gqa_attention",
    "gqa_prefill",
    "grouped_gemm",
    "mla_cache",
    "mla_decode",
    "moe_combine",
    "moe_dispatch",
    "moe_route",
    "MoEDispatch",
    "prepack_linear_weight",
    "prepack_moe_weights",
    "quantize_activation_fp8_group",
    "quantize_activation_per_token_int8",
    "quantize_model",
    "quantize_weight",
    "QuantLinear",
    "reshape_and_cache",
    "set_kernel_threads",
    "rms_norm",
    "rms_norm_",
    "rotary_embedding",
    "rotary_embedding_",
    "silu_and_mul",
    "use_backend",
    "w4a16_gemm",
    "w8a8_gemm",
    "w8a8_linear",
]
