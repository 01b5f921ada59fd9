"""Small transformers models built from configs with random weights (nothing downloaded), and a greedy
decoding loop with a DynamicCache: shared by the graph-pass tests, the ``omni-bench model`` preset and the demo."""

from __future__ import annotations

import torch


def llama_config(hidden: int = 64, layers: int = 2, vocab: int = 256, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32 or 2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=1024)


def qwen3_moe_config(hidden: int = 64, layers: int = 2, experts: int = 8, vocab: int = 256, top_k: int = 2,
                     heads: int = 4, kv_heads: int = 2):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                          moe_intermediate_size=hidden // 2, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, head_dim=hidden // heads, num_experts=experts,
                          num_experts_per_tok=top_k, max_position_embeddings=1024)


def mixtral_config(hidden: int = 64, layers: int = 2, experts: int = 8, vocab: int = 256, top_k: int = 2,
                   heads: int = 4, kv_heads: int = 2):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden // 2, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
                         num_experts_per_tok=top_k, max_position_embeddings=1024)


def deepseek_v3_config(hidden: int = 64, layers: int = 2, experts: int = 8, vocab: int = 256, top_k: int = 2,
                       groups: int = 2, topk_groups: int = 1, dense_layers: int = 1, heads: int = 4):
    """DeepSeek-V3's layout (MLA with q/kv LoRA, shared expert, grouped sigmoid router, first layers dense)
    at a small size; head dims scale with ``hidden`` (DeepSeek-V3: nope 128, rope 64, v 128)."""
    from transformers import DeepseekV3Config

    nope, rope = (64, 32) if hidden >= 512 else (16, 8)
    return DeepseekV3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 4,
        num_hidden_layers=layers, first_k_dense_replace=dense_layers, n_routed_experts=experts, n_shared_experts=1,
        num_experts_per_tok=top_k, n_group=groups, topk_group=topk_groups, num_attention_heads=heads,
        num_key_value_heads=heads, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 2, qk_nope_head_dim=nope,
        qk_rope_head_dim=rope, v_head_dim=nope, max_position_embeddings=1024)


def build(config, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A causal LM from ``config`` with random weights, eval mode. Router biases get small random values so that
    DeepSeek-V3's correction bias is exercised."""
    import copy

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # A copy per model: transformers keeps the config object, and prepare() / set_*_implementation() write the
    # attention / experts implementation into it, which would switch every model built from the same config.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-0.01, 0.01)
    return model


def mark_dynamic_inputs(input_ids: torch.Tensor, cache=None) -> None:
    """Batch and sequence length of the ids (and the cache length) dynamic: one compile for all lengths
    (``dynamic=True`` would also turn float attributes such as RMSNorm's eps into graph inputs)."""
    if input_ids.shape[0] > 1:
        torch._dynamo.mark_dynamic(input_ids, 0)
    if input_ids.shape[1] > 1:
        torch._dynamo.mark_dynamic(input_ids, 1)
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                # The first write keeps k/v's permuted layout, later ones (torch.cat) are contiguous: Dynamo
                # guards on strides, so make it contiguous once rather than compile the decode step twice.
                if not t.is_contiguous():
                    t = t.contiguous()
                    setattr(layer, name, t)
                if t.shape[0] > 1:
                    torch._dynamo.mark_dynamic(t, 0)
                torch._dynamo.mark_dynamic(t, 2)


def greedy(forward, model: torch.nn.Module, input_ids: torch.Tensor, steps: int,
           dynamic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with a DynamicCache through ``forward`` (the model or a compiled model).
    Returns (the prefill logits, the generated tokens [B, steps])."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if dynamic:
            mark_dynamic_inputs(input_ids)
        out = forward(input_ids=input_ids, cache=cache, use_cache=True)
        logits = out.logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        toks = [tok]
        for _ in range(steps - 1):
            if dynamic:
                mark_dynamic_inputs(tok, cache)
            out = forward(input_ids=tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok)
    return logits, torch.cat(toks, dim=1)
