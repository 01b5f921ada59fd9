"""Out-of-tree replacements for vLLM's RMSNorm, SiluAndMul and RotaryEmbedding custom ops.

``CustomOp.register_oot`` keys on the in-tree class *name*: once ``OmniRMSNorm`` is registered under "RMSNorm",
every ``RMSNorm(...)`` vLLM's models build is an ``OmniRMSNorm`` (a subclass, so weights, isinstance checks and
``forward_native`` stay vLLM's). On the CPU platform vLLM calls ``forward_cpu`` when the op is enabled, and
``forward_native`` (compiled by Inductor) when it is not; with Inductor vLLM disables custom ops by default
(``custom_ops: ["none"]``), so ``enabled`` is overridden: ``OMNI_VLLM_OPS`` decides, not ``custom_ops``.

Under vLLM's torch.compile the omni public functions trace to single ``torch.ops.omni.*`` nodes that Inductor
calls as extern kernels. A layer the omni op cannot serve keeps vLLM's ``forward_native`` (decided once, at
construction, and reported).
"""

from __future__ import annotations

import torch
from torch import Tensor
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

import omniops
from omniops.vllm import report

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class _Enabled:
    """Mixed in before the vLLM class: on whatever ``compilation_config.custom_ops`` says."""

    @classmethod
    def enabled(cls) -> bool:
        return True


class OmniRMSNorm(_Enabled, RMSNorm):
    """RMSNorm and fused residual add + RMSNorm on ``omniops.rms_norm`` (functional: returns new tensors)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._omni_why = self._why_not()
        report.layer_built("rms_norm", self._omni_why)

    def _why_not(self) -> str | None:
        if self.variance_size_override is not None:
            return "variance over a prefix of the hidden size (var_hidden_size)"
        if not self.has_weight:
            return "no weight (has_weight=False)"
        return None

    def forward_cpu(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        w = self.weight.data
        # dtype is static under tracing: a float32 weight on a bf16 activation (some checkpoints) stays vLLM's
        if self._omni_why is not None or x.dtype != w.dtype or x.dtype not in _FLOATS:
            return self.forward_native(x, residual)
        if residual is None:
            return omniops.rms_norm(x, w, self.variance_epsilon)
        return omniops.rms_norm(x, w, self.variance_epsilon, residual)


class OmniSiluAndMul(_Enabled, SiluAndMul):
    """``silu(x[..., :d]) * x[..., d:]`` on ``omniops.silu_and_mul``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        report.layer_built("silu_and_mul")

    def forward_cpu(self, x: Tensor) -> Tensor:
        if x.dtype not in _FLOATS or x.shape[-1] % 2:
            return self.forward_native(x)
        return omniops.silu_and_mul(x)


class OmniRotaryEmbedding(_Enabled, RotaryEmbedding):
    """vLLM's plain rotary embedding (neox or gpt-j pairing, partial rotary) on ``omniops.rotary_embedding``.
    Only the base class is replaced: scaled variants (YaRN, Llama-3, M-RoPE, ...) are other classes and stay."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._omni_why = None if hasattr(self, "cos_sin_cache") else "no cos/sin cache (init_cache=False)"
        report.layer_built("rotary_embedding", self._omni_why)

    def forward_cpu(self, positions: Tensor, query: Tensor,
                    key: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if self._omni_why is not None or query.dtype not in _FLOATS:
            return self.forward_native(positions, query, key)
        cache = self._match_cos_sin_cache_dtype(query)
        # vLLM v1 passes flat positions [T] and query/key [T, heads*D] or [T, heads, D]; omni returns the same shapes
        return omniops.rotary_embedding(positions, query, key, cache, self.head_size, self.rotary_dim,
                                        self.is_neox_style)
