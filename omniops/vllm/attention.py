"""Paged GQA attention on omni ops, as vLLM's CPU_ATTN attention backend (registered over its class path).

What vLLM 0.32's CPU platform allows: ``CpuPlatform.get_attn_backend_cls`` always returns CPU_ATTN (CPU_MLA /
AMX_MLA for MLA models) and ignores any other ``--attention-backend``; a plugin can only change the class behind
those enum members (``register_backend``). So this backend keeps CPU_ATTN's name, KV cache spec and declared
layout (LBHNC: per layer ``[num_blocks, kv_heads, block_size, 2 * head_size]``) and only reinterprets each
block's bytes as omni's ``[2, block_size, kv_heads, head_size]`` (K block then V block): the cache is written
and read by this backend alone, vLLM only allocates and zeroes whole blocks. A KV connector that copies blocks
in CPU_ATTN's layout would see omni's instead (none is configured by the plugin).

Per step: the new tokens are scattered into the cache (``write_kv``); a batch of decodes only runs
``omni::gqa_decode``, any other batch ``omni::gqa_prefill`` (every sequence's new tokens after its paged
prefix, decodes included). Attention runs eagerly inside vLLM's opaque attention op, where omni's public
functions call their kernels directly (not through the dispatcher), so each call is wrapped in a
``record_function("omniops.vllm::<op>")`` range: that is what shows in a torch profile (vLLM's
``--profiler-config``). Layers omni cannot serve (ALiBi, sliding window, logit soft-capping, sinks, encoder /
cross attention, fp8 KV cache) keep vLLM's kernels and vLLM's layout for their own cache.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.profiler import record_function
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

import omniops
from omniops.vllm import report

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def split_kv_cache(kv_cache: Tensor, num_kv_heads: int, head_size: int) -> tuple[Tensor, Tensor]:
    """A CPU_ATTN layer cache ``[num_blocks, kv_heads, block_size, 2 * head_size]`` (each block contiguous) as
    omni's ``k_cache, v_cache [num_blocks, block_size, kv_heads, head_size]`` views of the same memory."""
    if kv_cache.dim() != 4 or kv_cache.shape[1] != num_kv_heads or kv_cache.shape[3] != 2 * head_size:
        raise ValueError(f"kv_cache: expected [num_blocks, {num_kv_heads}, block_size, {2 * head_size}], "
                         f"got {list(kv_cache.shape)}")
    nb, _, bs, _ = kv_cache.shape
    kv = kv_cache.view(nb, 2, bs, num_kv_heads, head_size)
    return kv[:, 0], kv[:, 1]


def write_kv(kv_cache: Tensor, key: Tensor, value: Tensor, slot_mapping: Tensor, num_kv_heads: int,
             head_size: int) -> None:
    """Scatter new tokens' ``key / value [T, kv_heads, head_size]`` to ``slot_mapping [T]`` (-1 = padding).

    A torch scatter, not ``omni::reshape_and_cache``: that op (rightly) refuses K and V caches whose extents
    overlap, and here they interleave block by block in one tensor."""
    k_cache, v_cache = split_kv_cache(kv_cache, num_kv_heads, head_size)
    n = slot_mapping.shape[0]
    slots = slot_mapping.long()
    key, value = key[:n], value[:n]
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    bs = k_cache.shape[1]
    blk, off = slots // bs, slots % bs
    k_cache[blk, off] = key.to(k_cache.dtype)
    v_cache[blk, off] = value.to(v_cache.dtype)


def impl_why_not(impl: CPUAttentionBackendImpl) -> str | None:
    """Why omni's paged attention cannot serve this layer, or None."""
    if impl.attn_type != AttentionType.DECODER:
        return f"attention type {impl.attn_type}"
    if impl.alibi_slopes is not None:
        return "ALiBi"
    if impl.sliding_window != -1:
        return "sliding window"
    if impl.logits_soft_cap:
        return "logit soft-capping"
    if impl.sinks is not None:
        return "attention sinks"
    if impl.kv_cache_dtype != "auto":
        return f"kv cache dtype {impl.kv_cache_dtype}"
    if impl.kv_sharing_target_layer_name is not None:
        return "KV sharing between layers"
    return None


class OmniCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata (layers that fall back need it) plus int32 tables for the omni ops, once per step."""

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        qsl = md.query_start_loc.to(torch.int32)
        seq_lens = md.seq_lens.to(torch.int32)
        md.omni_cu_seqlens = qsl
        md.omni_seq_lens = seq_lens
        md.omni_context_lens = seq_lens - (qsl[1:] - qsl[:-1])
        md.omni_block_table = md.block_table.to(torch.int32)
        return md


class OmniCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._omni_why = impl_why_not(self)
        report.layer_built("attention", self._omni_why)

    def do_kv_cache_update(self, layer, key: Tensor, value: Tensor, kv_cache: Tensor,
                           slot_mapping: Tensor) -> None:
        if self._omni_why is not None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        write_kv(kv_cache, key, value, slot_mapping, self.num_kv_heads, self.head_size)

    def forward(self, layer, query: Tensor, key: Tensor, value: Tensor, kv_cache: Tensor, attn_metadata,
                output: Tensor, output_scale: Tensor | None = None,
                output_block_scale: Tensor | None = None) -> Tensor:
        if (self._omni_why is not None or attn_metadata is None or output_scale is not None
                or output_block_scale is not None or not attn_metadata.causal or query.dtype not in _FLOATS):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        md = attn_metadata
        n = md.num_actual_tokens
        k_cache, v_cache = split_kv_cache(kv_cache, self.num_kv_heads, self.head_size)
        if md.max_query_len == 1:
            with record_function("omniops.vllm::gqa_decode"):
                out = omniops.gqa_decode(query[:n], k_cache, v_cache, md.omni_block_table, md.omni_seq_lens,
                                         self.scale, validate=False)
        else:
            with record_function("omniops.vllm::gqa_prefill"):
                out = omniops.gqa_prefill(query[:n], key[:n], value[:n], md.omni_cu_seqlens, causal=True,
                                          scale=self.scale, k_cache=k_cache, v_cache=v_cache,
                                          block_table=md.omni_block_table, context_lens=md.omni_context_lens,
                                          validate=False)
        output[:n].view_as(out).copy_(out)
        return output


class OmniCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[OmniCPUAttentionImpl]:
        return OmniCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[OmniCPUAttentionMetadataBuilder]:
        return OmniCPUAttentionMetadataBuilder
