"""MLA (DeepSeek-V2/V3) decode on ``omni::mla_decode``, behind vLLM's CPU_MLA and AMX_MLA backends.

vLLM's MLA layer absorbs ``W_UK`` into the decode queries and ``W_UV`` into the output itself, so a backend's
``forward_mqa`` only attends ``q [B, H, kv_lora_rank + rope]`` over the latent cache ``[num_blocks,
block_size, 576]`` — omni's ``mla_decode`` contract and its cache layout (``cat(kv_c, k_pe)`` rows), which is
also what ``omni::mla_cache`` writes. The prefill half (``forward_mha``: SDPA on the reference backend, AMX
extend kernels on the AMX one) stays vLLM's; it reads the same cache.

The CPU platform chooses AMX_MLA on AMX machines (bfloat16 only) and CPU_MLA otherwise or when asked for
(``--attention-backend CPU_MLA``, needed for float32 there); both are overridden.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.profiler import record_function
from vllm.v1.attention.backends.mla.amx_mla import AMXMLABackend, AMXMLAImpl
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

import omniops
from omniops.vllm import report


class _OmniMLADecode:
    """Mixin over a vLLM MLA impl: omni decode and cache writes; vLLM's prefill."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        why = None
        if self.kv_cache_dtype != "auto":
            why = f"kv cache dtype {self.kv_cache_dtype}"
        elif self.head_size != self.kv_lora_rank + self.qk_rope_head_dim:
            why = f"latent head size {self.head_size} != kv_lora_rank + rope"
        self._omni_why = why
        report.layer_built("mla_decode", why)

    def do_kv_cache_update(self, kv_c_normed: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor,
                           kv_cache_dtype: str, k_scale: Tensor) -> None:
        if self._omni_why is not None or kv_cache.numel() == 0:
            return super().do_kv_cache_update(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale)
        slots = slot_mapping.flatten()
        n = slots.shape[0]
        with record_function("omniops.vllm::mla_cache"):
            omniops.mla_cache(kv_c_normed[:n], k_pe[:n].reshape(n, -1), kv_cache, slots, validate=False)

    def forward_mqa(self, q: Tensor | tuple[Tensor, Tensor], kv_c_and_k_pe_cache: Tensor, attn_metadata,
                    layer) -> tuple[Tensor, Tensor | None]:
        if self._omni_why is not None:
            return super().forward_mqa(q, kv_c_and_k_pe_cache, attn_metadata, layer)
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        decode = attn_metadata.decode
        with record_function("omniops.vllm::mla_decode"):  # eager, like omniops.vllm.attention
            out = omniops.mla_decode(q, kv_c_and_k_pe_cache, decode.block_table.to(torch.int32),
                                     decode.seq_lens.to(torch.int32), self.scale, v_dim=self.kv_lora_rank,
                                     validate=False)
        return out, None  # no LSE: decode context parallelism is off on CPU


class OmniCPUMLAImpl(_OmniMLADecode, CPUMLAImpl):
    pass


class OmniAMXMLAImpl(_OmniMLADecode, AMXMLAImpl):
    pass


class OmniCPUMLABackend(CPUMLABackend):
    @staticmethod
    def get_impl_cls() -> type[OmniCPUMLAImpl]:
        return OmniCPUMLAImpl


class OmniAMXMLABackend(AMXMLABackend):
    @staticmethod
    def get_impl_cls() -> type[OmniAMXMLAImpl]:
        return OmniAMXMLAImpl
