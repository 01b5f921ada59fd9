"""Model runners on omni ops, one module per family; ``build_model`` picks one from ``config.architectures``."""

from __future__ import annotations

from pathlib import Path

from omniops.serving.models.base import AttentionMetadata, DecoderModel
from omniops.serving.models.deepseek_v3 import DeepseekV3ForCausalLM
from omniops.serving.models.llama import LlamaForCausalLM, Qwen3MoeForCausalLM
from omniops.serving.models.loader import WeightStore, load_config, resolve_dtype

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}


def build_model(model_dir: str | Path, dtype: str = "auto", *, quantization: str | None = None,
                max_positions: int | None = None) -> tuple[DecoderModel, object]:
    """Load the checkpoint in ``model_dir``. Returns ``(model, hf_config)``."""
    config = load_config(model_dir)
    archs = list(getattr(config, "architectures", None) or [])
    cls = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if cls is None:
        raise ValueError(f"model: architecture {archs or '(none in config.json)'} is not supported; "
                         f"supported: {', '.join(sorted(ARCHITECTURES))}")
    weights = WeightStore(model_dir, resolve_dtype(config, dtype))
    max_pos = max_positions or config.max_position_embeddings
    return cls(config, weights, quantization=quantization, max_positions=max_pos), config


__all__ = ["ARCHITECTURES", "AttentionMetadata", "DecoderModel", "build_model"]
