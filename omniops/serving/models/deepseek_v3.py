"""DeepSeek-V3 / R1 on omni ops: MLA over the latent paged cache, dense first layers, grouped sigmoid routing
with the correction bias, shared experts fused into the routed ``fused_moe`` call.

MLA: the cache holds one row per token, ``cat(kv_c, k_pe)`` [kv_lora_rank + rope] (``mla_cache``).
* Decode is weight-absorbed (as FlashMLA / vLLM): ``q_nope`` goes through W_UK (kv_b_proj's key rows) into the
  latent space, ``mla_decode`` attends all heads to the shared latent rows, and W_UV maps the result back.
* Prefill expands K/V through kv_b_proj (fewer FLOPs per token pair than the absorbed form): sequences without
  cached context run one varlen ``gqa_prefill`` over the new tokens; a chunk after cached context (chunked
  prefill, prefix hits) gathers its latent rows from the cache, expands them and runs ``gqa_attention``
  (bottom-right causal) for that sequence.
RoPE: DeepSeek's interleaved pairs are GPT-J style rotation (``is_neox=False``); HF de-interleaves its output,
which permutes q_pe and k_pe alike and leaves every score unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import omniops
from omniops.serving.models.base import (
    AttentionMetadata,
    DecoderModel,
    DenseMLP,
    FusedMoE,
    Linear,
    PerHead,
    rope_cache,
)
from omniops.serving.models.loader import WeightStore


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class DeepseekV3ForCausalLM(DecoderModel):
    # steps with prefill chunks split decode from prefill and loop over sequences with context on the host: only
    # decode-only steps (the steady state of serving) run compiled, like decode-only CUDA graphs in vLLM
    compile_scope = "decode"
    def __init__(self, config, weights: WeightStore, *, quantization: str | None = None, max_positions: int):
        c = self.config = config
        self.dtype = weights.dtype
        self.num_layers = c.num_hidden_layers
        self.H = c.num_attention_heads
        self.dn, self.dr, self.dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.R = c.kv_lora_rank
        self.eps = c.rms_norm_eps
        rp = c.rope_parameters or {}
        self.scale = (self.dn + self.dr) ** -0.5
        if rp.get("rope_type", "default") != "default" and rp.get("mscale_all_dim"):
            self.scale *= _yarn_mscale(rp["factor"], rp["mscale_all_dim"]) ** 2
        self.interleaved = bool(getattr(c, "rope_interleave", True))
        self.cos_sin = rope_cache(c, self.dr, max_positions, self.dtype)
        self.embed, head = weights.embeddings(bool(getattr(c, "tie_word_embeddings", False)))
        self.lm_head = Linear(head)
        self.norm = weights.get("model.norm.weight")
        self.layers = [self._layer(weights, i, quantization) for i in range(self.num_layers)]
        self.kv_caches: list[Tensor] = []

    # ---- loading -------------------------------------------------------------------------------------------
    def _layer(self, w: WeightStore, i: int, quant: str | None) -> dict:
        c, p = self.config, f"model.layers.{i}"
        a = f"{p}.self_attn"
        kv_b = w.get(f"{a}.kv_b_proj.weight").view(self.H, self.dn + self.dv, self.R)
        layer = {
            "in_norm": w.get(f"{p}.input_layernorm.weight"),
            "post_norm": w.get(f"{p}.post_attention_layernorm.weight"),
            "kv_a_norm": w.get(f"{a}.kv_a_layernorm.weight"),
            "kv_b": Linear(kv_b.reshape(-1, self.R), quant),
            "w_uk": PerHead(kv_b[:, :self.dn].transpose(1, 2)),  # q_nope [B, H, dn] -> q_latent [B, H, R]
            "w_uv": PerHead(kv_b[:, self.dn:]),  # latent out [B, H, R] -> [B, H, dv]
            "o": Linear(w.get(f"{a}.o_proj.weight"), quant),
        }
        kv_a = w.get(f"{a}.kv_a_proj_with_mqa.weight")
        if c.q_lora_rank is None:
            layer["q"] = Linear(w.get(f"{a}.q_proj.weight"), quant)
            layer["kv_a"] = Linear(kv_a, quant)
        else:  # q_a and kv_a read the same input: one GEMM (vLLM's fused_qkv_a_proj)
            layer["qkv_a"] = Linear(torch.cat([w.get(f"{a}.q_a_proj.weight"), kv_a]), quant)
            layer["q_a_norm"] = w.get(f"{a}.q_a_layernorm.weight")
            layer["q_b"] = Linear(w.get(f"{a}.q_b_proj.weight"), quant)
        m = f"{p}.mlp"
        if i < c.first_k_dense_replace:
            layer["mlp"] = DenseMLP(w.get(f"{m}.gate_proj.weight"), w.get(f"{m}.up_proj.weight"),
                                    w.get(f"{m}.down_proj.weight"), quant)
        else:
            layer["mlp"] = self._moe(w, m, quant)
        return layer

    def _moe(self, w: WeightStore, m: str, quant: str | None) -> FusedMoE:
        c = self.config
        gate = w.get(f"{m}.gate.weight", torch.float32)  # HF keeps the router in fp32
        bias = w.get(f"{m}.gate.e_score_correction_bias", torch.float32)
        top_k, groups, topk_groups = c.num_experts_per_tok, c.n_group, c.topk_group
        renorm, scaling = bool(c.norm_topk_prob), float(c.routed_scaling_factor)

        def route(x: Tensor) -> tuple[Tensor, Tensor]:
            logits = torch.nn.functional.linear(x.float(), gate)
            return omniops.moe_route(logits, top_k, scoring="sigmoid", renormalize=renorm, num_groups=groups,
                                     topk_groups=topk_groups, correction_bias=bias, routed_scaling=scaling)

        w13, w2 = w.experts(f"{m}.experts", c.n_routed_experts)
        shared = None
        if getattr(c, "n_shared_experts", 0):
            shared = tuple(w.get(f"{m}.shared_experts.{n}_proj.weight") for n in ("gate", "up", "down"))
        return FusedMoE(w13, w2, route, shared, quant)

    # ---- KV cache ------------------------------------------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        return self.num_layers * block_size * (self.R + self.dr) * self.dtype.itemsize

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        self.kv_caches = [torch.zeros(num_blocks, block_size, self.R + self.dr, dtype=self.dtype)
                          for _ in range(self.num_layers)]

    # ---- forward -------------------------------------------------------------------------------------------
    def _attention(self, layer: dict, i: int, x: Tensor, meta: AttentionMetadata) -> Tensor:
        T, H, dn, dr, dv, R = x.shape[0], self.H, self.dn, self.dr, self.dv, self.R
        if "q" in layer:
            q, kv = layer["q"](x), layer["kv_a"](x)
        else:
            qa, kv = layer["qkv_a"](x).split([self.config.q_lora_rank, R + dr], dim=-1)
            q = layer["q_b"](omniops.rms_norm(qa, layer["q_a_norm"], self.eps))
        q = q.view(T, H, dn + dr)
        kv_c = omniops.rms_norm(kv[:, :R], layer["kv_a_norm"], self.eps)
        q_pe, k_pe = omniops.rotary_embedding(meta.positions, q[..., dn:].reshape(T, H * dr),
                                              kv[:, R:].contiguous(), self.cos_sin, dr, dr, not self.interleaved)
        q_pe = q_pe.view(T, H, dr)
        cache = self.kv_caches[i]
        omniops.mla_cache(kv_c, k_pe, cache, meta.slot_mapping, validate=False)
        nd = meta.num_decode
        out = x.new_empty(T, H, dv)
        if nd:
            q_lat = layer["w_uk"](q[:nd, :, :dn])  # [Bd, H, R]
            lat = omniops.mla_decode(torch.cat([q_lat, q_pe[:nd]], -1), cache, meta.decode_block_table,
                                     meta.decode_seq_lens, self.scale, v_dim=R, validate=False)
            out[:nd] = layer["w_uv"](lat)
        if nd < T:
            self._prefill(layer, q[nd:, :, :dn], q_pe[nd:], kv_c[nd:], k_pe[nd:], cache, meta, out[nd:])
        return layer["o"](out.view(T, H * dv))

    def _expand(self, layer: dict, kv_c: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        L, H, dn = kv_c.shape[0], self.H, self.dn
        kv = layer["kv_b"](kv_c).view(L, H, dn + self.dv)
        k = torch.cat([kv[..., :dn], k_pe[:, None, :].expand(L, H, self.dr)], -1)
        return k, kv[..., dn:]

    def _prefill(self, layer: dict, q_nope: Tensor, q_pe: Tensor, kv_c: Tensor, k_pe: Tensor, cache: Tensor,
                 meta: AttentionMetadata, out: Tensor) -> None:
        q = torch.cat([q_nope, q_pe], -1)
        if not meta.any_context:
            k, v = self._expand(layer, kv_c, k_pe)
            out.copy_(omniops.gqa_prefill(q, k, v, meta.prefill_cu_seqlens, causal=True, scale=self.scale,
                                          validate=False))
            return
        bs, start = cache.shape[1], 0
        for b, (ctx, n) in enumerate(zip(meta.prefill_context, meta.prefill_query, strict=True)):
            L = ctx + n
            blocks = meta.prefill_block_table[b, :-(-L // bs)].long()
            rows = cache[blocks].view(-1, cache.shape[2])[:L]  # the context's latents, then this chunk's
            k, v = self._expand(layer, rows[:, :self.R], rows[:, self.R:])
            qb = q[start:start + n].transpose(0, 1)[None]  # [1, H, n, D]
            o = omniops.gqa_attention(qb, k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=True,
                                      scale=self.scale)
            out[start:start + n] = o[0].transpose(0, 1)
            start += n

