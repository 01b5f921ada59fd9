"""Hugging Face transformers integration: "omni" entries in ``ALL_EXPERTS_FUNCTIONS`` and
``ALL_ATTENTION_FUNCTIONS``, omni router forwards, and ``prepare(model)`` that switches a model to them.

* experts ("omni"): ``omniops.fused_moe(hidden, gate_up_proj [E,2I,H], down_proj [E,H,I], weights, ids)`` — HF's
  expert layout is fused_moe's. Experts with biases, transposed or interleaved weights, a post-expert norm,
  another activation or expert parallelism keep HF's ``grouped_mm``.
* routers: softmax top-k (Mixtral, Qwen3-MoE) and DeepSeek-V3's grouped sigmoid router -> ``omniops.moe_route``.
* MLA (DeepSeek-V3 attention): decode steps weight-absorbed onto ``gqa_attention`` over the latent cache (one
  kv head), instead of HF's re-expansion of every cached token through kv_b_proj each step.
* attention ("omni"): ``omniops.gqa_attention`` over HF's contiguous cache (GQA without repeat_kv, bool masks
  from ``sdpa_mask``, which is None for plain causal attention without padding). CPU tensors only; on other
  devices, with dropout in training, a position bias, soft-capping or attention sinks it is HF's SDPA path.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F

import omniops

log = logging.getLogger("omniops.graph_passes")


# ---- experts ---------------------------------------------------------------------------------------------------
def _experts_supported(m: torch.nn.Module) -> str | None:
    """None when fused_moe computes exactly this experts module, else why not."""
    for attr, want in (("has_gate", True), ("has_bias", False), ("is_transposed", False),
                       ("is_concatenated", True), ("has_post_expert_norm", False), ("_is_expert_parallel", False)):
        if getattr(m, attr, want) != want:
            return f"{type(m).__name__}.{attr}={getattr(m, attr)!r} (fused_moe needs {want})"
    act = getattr(getattr(m, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"activation {act!r} (fused_moe computes SiLU-and-mul)"
    if not (hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")):
        return f"{type(m).__name__} has no gate_up_proj/down_proj"
    return None


def omni_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """ExpertsInterface "omni": one fused_moe call (HF's gate_up_proj/down_proj are its w13/w2)."""
    why = _experts_supported(self)
    if why is not None:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return omniops.fused_moe(hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index,
                             activation="silu")


# ---- routers ---------------------------------------------------------------------------------------------------
def _softmax_router_forward(self: torch.nn.Module, hidden_states: torch.Tensor):
    # Qwen3MoeTopKRouter / MixtralTopKRouter: softmax (fp32) top-k, optional renormalisation
    h = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(h, self.weight)
    renorm = bool(getattr(self, "norm_topk_prob", True))
    w, ids = omniops.moe_route(logits, self.top_k, scoring="softmax", renormalize=renorm)
    if self._omni_weights_in_logits_dtype:
        w = w.to(logits.dtype)
    return logits, w, ids if self._omni_int32_ids else ids.long()


def _sigmoid_router_forward(self: torch.nn.Module, hidden_states: torch.Tensor):
    # DeepseekV3TopkRouter: sigmoid scores, correction bias for the choice, group-limited top-k, scaling
    h = hidden_states.view(-1, self.hidden_dim)
    logits = F.linear(h.type(torch.float32), self.weight.type(torch.float32))
    w, ids = omniops.moe_route(
        logits, self.top_k, scoring="sigmoid", renormalize=bool(self.norm_topk_prob),
        num_groups=self.num_group, topk_groups=self.topk_group, correction_bias=self.e_score_correction_bias,
        routed_scaling=float(self.routed_scaling_factor))
    return logits, w, ids if self._omni_int32_ids else ids.long()


def _router_kind(m: torch.nn.Module) -> str | None:
    name = type(m).__name__
    if not name.endswith(("TopKRouter", "TopkRouter")) or not hasattr(m, "weight") or not hasattr(m, "top_k"):
        return None
    if hasattr(m, "e_score_correction_bias") and hasattr(m, "num_group"):
        return "sigmoid"
    if "Qwen3Moe" in name or "Mixtral" in name or "Qwen2Moe" in name:
        return "softmax"
    return None


# ---- MLA (DeepSeek-V3 attention) ------------------------------------------------------------------------------
def _is_mla(m: torch.nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("kv_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "qk_nope_head_dim",
                                       "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "o_proj"))


def _mla_forward(self: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings, attention_mask,
                 cache=None, **kwargs: Any):
    """DeepseekV3Attention with the decode step weight-absorbed (as vLLM / FlashMLA do).

    HF caches the compressed latent (kv_nope [B, 1, L, R], k_rot [B, 1, L, P]) and re-expands all L tokens
    through kv_b_proj every step. With W_UK / W_UV (kv_b_proj's per-head nope / v rows) folded into q and the
    output, one decode step is MQA over the latent itself: q' = [q_nope W_UK, q_rot] [B, H, 1, R+P] against
    k = [kv_nope, k_rot] [B, 1, L, R+P], v = kv_nope, out = o W_UV^T — omniops.gqa_attention with one kv head
    (its split-KV decode). Prefill (S > 1) keeps HF's expanded form, which costs fewer FLOPs there."""
    import sys

    B, S = hidden_states.shape[:-1]
    if S != 1 or hidden_states.device.type != "cpu":
        return self._omni_mla_orig(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    H, dn, dr, dv, R = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.kv_lora_rank
    mod = sys.modules[type(self).__module__]
    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q = q.view(B, S, H, dn + dr).transpose(1, 2)
    q_pass, q_rot = torch.split(q, [dn, dr], dim=-1)
    kv_nope, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [R, dr], dim=-1)
    kv_nope = self.kv_a_layernorm(kv_nope).view(B, 1, S, R)
    k_rot = k_rot.view(B, 1, S, dr)
    cos, sin = position_embeddings
    rope = mod.apply_rotary_pos_emb_interleave if self.config.rope_interleave else mod.apply_rotary_pos_emb
    q_rot, k_rot = rope(q_rot, k_rot, cos, sin)
    if cache is not None:
        kv_nope, k_rot = cache.update(kv_nope, k_rot, self.layer_idx, kwargs=kwargs)
    w = self.kv_b_proj.weight.view(H, dn + dv, R)
    q_lat = torch.einsum("bhsd,hdr->bhsr", q_pass, w[:, :dn])
    out = omniops.gqa_attention(torch.cat([q_lat, q_rot], dim=-1), torch.cat([kv_nope, k_rot], dim=-1), kv_nope,
                                attention_mask, scale=self.scaling)
    out = torch.einsum("bhsr,hvr->bshv", out, w[:, dn:]).reshape(B, S, H * dv)
    return self.o_proj(out), None


# ---- registration ------------------------------------------------------------------------------------------------
_REGISTERED = False


def register() -> bool:
    """Register "omni" in transformers' experts, attention and mask interfaces. False without transformers."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.integrations.moe import ExpertsInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False

    def omni_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any):
        """AttentionInterface "omni": omniops.gqa_attention (see the module docstring); HF's SDPA otherwise."""
        unsupported = (query.device.type != "cpu" or (dropout and module.training)
                       or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux", "sinks"))
                       or (attention_mask is not None and attention_mask.dim() != 4))
        S, L = query.shape[2], key.shape[2]
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        causal = causal and attention_mask is None and S > 1
        if causal and L > S:  # an empty StaticCache's future slots: SDPA's top-left is_causal ignores them
            key, value, L = key[:, :, :S], value[:, :, :S], S
        if unsupported or S > L:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        if attention_mask is not None and attention_mask.shape[-1] != L:
            attention_mask = attention_mask[..., :L]
        out = omniops.gqa_attention(query, key, value, attention_mask, causal=causal, scale=scaling)
        return out.transpose(1, 2), None  # [B, S, H, Dv], contiguous already (gqa_attention's layout)

    ExpertsInterface.register("omni", omni_experts_forward)
    AttentionInterface.register("omni", omni_attention_forward)
    AttentionMaskInterface.register("omni", sdpa_mask)
    _REGISTERED = True
    return True


def _prepack_experts(mods: list[torch.nn.Module]) -> int:
    """Pack bf16 expert weights into the AMX tile layout now (the amx kernel library only), so that the first
    request does not pay for it; fused_moe finds the packed copies by the weights. Returns how many."""
    from omniops.ops import prepack

    n = 0
    for m in mods:
        w13, w2 = m.gate_up_proj, m.down_proj
        if w13.dtype == torch.bfloat16 and w13.device.type == "cpu" and prepack.tiles_active():
            prepack.prepack_moe_weights(w13, w2)
            n += 1
    return n


def prepare(model: torch.nn.Module, *, experts: bool = True, routers: bool = True,
            attention: bool = True) -> dict[str, Any]:
    """Switch an HF model to the omni implementations, in place. Returns what changed and what did not (why).

    ``experts``: ``config._experts_implementation = "omni"`` (fused_moe); ``routers``: router forwards ->
    moe_route; ``attention``: ``_attn_implementation = "omni"``. Parts whose op is absent are left as they are.
    """
    if not register():
        raise ImportError("omniops.graph_passes.prepare needs transformers")
    out: dict[str, Any] = {"experts": 0, "routers": 0, "attention": False, "skipped": {}}
    experts_mods = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]
    use_experts = False
    if experts and experts_mods:
        why = next((w for w in map(_experts_supported, experts_mods) if w), None)
        if why is None and hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation("omni")
            use_experts = True
            out["experts"] = len(experts_mods)
            out["prepacked"] = _prepack_experts(experts_mods)
        else:
            out["skipped"]["experts"] = why or "model has no set_experts_implementation"
    if routers:
        for m in model.modules():
            kind = _router_kind(m)
            if kind is None:
                continue
            m._omni_int32_ids = use_experts  # HF's own experts index with int64 (one_hot)
            m._omni_weights_in_logits_dtype = "Qwen" in type(m).__name__
            fwd = _sigmoid_router_forward if kind == "sigmoid" else _softmax_router_forward
            m.forward = types.MethodType(fwd, m)
            out["routers"] += 1
    if attention and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("omni")
        out["attention"] = True
        for m in model.modules():
            if _is_mla(m) and not hasattr(m, "_omni_mla_orig"):
                m._omni_mla_orig = m.forward
                m.forward = types.MethodType(_mla_forward, m)
                out["mla_absorbed"] = out.get("mla_absorbed", 0) + 1
    if out["skipped"]:
        log.info("omni prepare: %s", out["skipped"])
    return out
