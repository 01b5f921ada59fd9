"""Engine settings (vLLM's names), checked once. ``EngineConfig.from_kwargs`` is what ``LLM(...)`` and
``omni-serve`` build."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("w8a8", "fp8_block", "w4a16")


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"  # "auto" = the checkpoint's torch_dtype
    max_model_len: int | None = None  # default: the config's max_position_embeddings
    kv_cache_memory: float = 1.0  # GiB of KV cache (all layers together)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    quantization: str | None = None
    enforce_eager: bool = False
    seed: int = 0
    # expert parallelism (omniops.serving.ep): MoE experts over `ep` ranks, attention replicated
    ep: int = 1
    redundant_experts: int = 0  # extra physical expert slots per MoE layer, over all ranks
    placement: str = "off"  # off | static (planned once from the warm-up) | dynamic (incremental every interval)
    placement_interval: int = 32  # steps per load window / placement update
    placement_max_moves: int | None = None  # slot changes per layer and dynamic update (default ~10% of slots)
    placement_nodes: int = 1  # hierarchical placement over this many nodes (blocks of consecutive ranks)
    ep_timeout: float = 60.0  # seconds before a hung rank fails a step

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise ValueError(f"model: {self.model!r} is not a directory (a local Hugging Face checkpoint)")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: expected one of {QUANTIZATIONS} or None, got {self.quantization!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len: expected a positive int, got {self.max_model_len!r}")
        if not isinstance(self.kv_cache_memory, (int, float)) or not self.kv_cache_memory > 0:
            raise ValueError(f"kv_cache_memory: expected a positive number of GiB, got {self.kv_cache_memory!r}")
        from omniops.serving.ep.options import check_ep_options

        check_ep_options(self)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(model=str(model), **kwargs)

    def check_model_len(self, max_positions: int) -> None:
        """Resolve ``max_model_len`` against the model and the batch budget."""
        if self.max_model_len is None:
            self.max_model_len = max_positions
        if self.max_model_len > max_positions:
            raise ValueError(f"max_model_len: {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"({max_positions})")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens: {self.max_num_batched_tokens} must be >= max_model_len "
                             f"({self.max_model_len}) without chunked prefill")
