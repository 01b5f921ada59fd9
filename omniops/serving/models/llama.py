"""GQA decoder families on omni ops: Llama, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm) and Qwen3-MoE (their
attention + softmax top-k routed experts on ``fused_moe``).

Per layer: fused residual-add + RMSNorm, one qkv GEMM, optional per-head q/k norm, ``rotary_embedding``,
``reshape_and_cache`` + paged attention (``gqa_decode`` / ``gqa_prefill``), o_proj, then the MLP or MoE block.
"""

from __future__ import annotations

import torch
from torch import Tensor

import omniops
from omniops.serving.models.base import (
    AttentionMetadata,
    DecoderModel,
    DenseMLP,
    FusedMoE,
    Linear,
    paged_gqa,
    rope_cache,
)
from omniops.serving.models.loader import WeightStore


class GQADecoder(DecoderModel):
    """The shared model; subclasses say which layers carry a MoE block."""

    compile_scope = "all"  # the forward reads only the metadata's tensors: one graph for every batch shape

    def __init__(self, config, weights: WeightStore, *, quantization: str | None = None, max_positions: int):
        c = self.config = config
        self.dtype = weights.dtype
        self.num_layers = c.num_hidden_layers
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        rot = int(self.head_dim * (c.rope_parameters or {}).get("partial_rotary_factor", 1.0))
        self.rotary_dim = rot
        self.cos_sin = rope_cache(c, rot, max_positions, self.dtype)
        self.embed, head = weights.embeddings(bool(getattr(c, "tie_word_embeddings", False)))
        self.lm_head = Linear(head)  # kept in the model dtype: logits are cast to fp32 after
        self.norm = weights.get("model.norm.weight")
        self.layers = [self._layer(weights, i, quantization) for i in range(self.num_layers)]
        self.k_caches: list[Tensor] = []
        self.v_caches: list[Tensor] = []

    # ---- loading -------------------------------------------------------------------------------------------
    def _layer(self, w: WeightStore, i: int, quant: str | None) -> dict:
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        bias = w.has(f"{a}.q_proj.bias")
        qkv = torch.cat([w.get(f"{a}.{n}_proj.weight") for n in "qkv"])
        qkv_b = torch.cat([w.get(f"{a}.{n}_proj.bias") for n in "qkv"]) if bias else None
        layer = {
            "in_norm": w.get(f"{p}.input_layernorm.weight"),
            "post_norm": w.get(f"{p}.post_attention_layernorm.weight"),
            "qkv": Linear(qkv, quant, qkv_b),
            "o": Linear(w.get(f"{a}.o_proj.weight"), quant),
            "q_norm": w.get(f"{a}.q_norm.weight") if w.has(f"{a}.q_norm.weight") else None,
            "k_norm": w.get(f"{a}.k_norm.weight") if w.has(f"{a}.k_norm.weight") else None,
        }
        layer["mlp"] = self._mlp(w, i, quant)
        return layer

    def _mlp(self, w: WeightStore, i: int, quant: str | None):
        p = f"model.layers.{i}.mlp"
        return DenseMLP(w.get(f"{p}.gate_proj.weight"), w.get(f"{p}.up_proj.weight"), w.get(f"{p}.down_proj.weight"),
                        quant)

    # ---- KV cache ------------------------------------------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]

    # ---- forward -------------------------------------------------------------------------------------------
    def _attention(self, layer: dict, i: int, x: Tensor, meta: AttentionMetadata) -> Tensor:
        T = x.shape[0]
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = layer["qkv"](x).split([hq * d, hk * d, hk * d], dim=-1)
        if layer["q_norm"] is not None:  # Qwen3: RMSNorm over each head before RoPE
            q = omniops.rms_norm(q.reshape(T, hq, d), layer["q_norm"], self.eps).view(T, hq * d)
            k = omniops.rms_norm(k.reshape(T, hk, d), layer["k_norm"], self.eps).view(T, hk * d)
        q, k = omniops.rotary_embedding(meta.positions, q, k, self.cos_sin, d, self.rotary_dim, True)
        out = paged_gqa(q.view(T, hq, d), k.view(T, hk, d), v.view(T, hk, d), self.k_caches[i], self.v_caches[i],
                        meta, self.scale)
        return layer["o"](out.reshape(T, hq * d))


class LlamaForCausalLM(GQADecoder):
    """Llama, Qwen2 and Qwen3 dense (the differences are in the checkpoint: biases, q/k norms)."""


class Qwen3MoeForCausalLM(GQADecoder):
    def _mlp(self, w: WeightStore, i: int, quant: str | None):
        c = self.config
        sparse = (i not in (c.mlp_only_layers or []) and c.num_experts > 0
                  and (i + 1) % c.decoder_sparse_step == 0)
        if not sparse:
            return super()._mlp(w, i, quant)
        p = f"model.layers.{i}.mlp"
        gate = Linear(w.get(f"{p}.gate.weight"))  # the omni GEMM at decode rows: torch's bf16 GEMV costs ~0.1 ms here
        top_k, renorm = c.num_experts_per_tok, bool(c.norm_topk_prob)

        def route(x: Tensor) -> tuple[Tensor, Tensor]:
            logits = gate(x)
            tw, ids = omniops.moe_route(logits, top_k, scoring="softmax", renormalize=renorm)
            return tw.to(logits.dtype), ids  # HF rounds the weights to the model dtype

        w13, w2 = w.experts(f"{p}.experts", c.num_experts)
        return FusedMoE(w13, w2, route, quantization=quant)
