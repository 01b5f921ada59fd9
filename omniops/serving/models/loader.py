"""Reading a local Hugging Face checkpoint: config, safetensors (single file or sharded through
``model.safetensors.index.json``, memory-mapped), converted once into the layouts the ops want."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor


class MissingWeightError(KeyError, ValueError):
    """A tensor the model needs is not in the checkpoint (a KeyError naming it; a ValueError to callers)."""

    def __str__(self) -> str:
        return str(self.args[0])


class WeightStore:
    """Name -> tensor over the checkpoint's safetensors files, cast to ``dtype`` on read."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype):
        d = Path(model_dir)
        self.dtype = dtype
        index = d / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in d.glob("*.safetensors"))
            if not files:
                raise ValueError(f"model: no *.safetensors files in {d}")
            weight_map = None
        self._handles = {f: safe_open(str(d / f), framework="pt", device="cpu") for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._where = weight_map
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        f = self._where.get(name)
        if f is None:
            raise MissingWeightError(f"checkpoint has no tensor {name!r}")
        self.used.add(name)
        t = self._handles[f].get_tensor(name)
        return t.to(dtype or self.dtype)

    def experts(self, prefix: str, num_experts: int) -> tuple[Tensor, Tensor]:
        """``(w13 [E, 2I, H], w2 [E, H, I])`` from either layout: transformers' fused ``experts.gate_up_proj`` /
        ``experts.down_proj``, or the per-expert ``experts.N.{gate,up,down}_proj.weight`` of real checkpoints."""
        if self.has(f"{prefix}.gate_up_proj"):
            w13, w2 = self.get(f"{prefix}.gate_up_proj"), self.get(f"{prefix}.down_proj")
            if w13.shape[0] != num_experts:
                raise ValueError(f"{prefix}.gate_up_proj: expected {num_experts} experts, got {w13.shape[0]}")
            return w13.contiguous(), w2.contiguous()
        gate = [self.get(f"{prefix}.{e}.gate_proj.weight") for e in range(num_experts)]
        up = [self.get(f"{prefix}.{e}.up_proj.weight") for e in range(num_experts)]
        w13 = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up, strict=True)])
        w2 = torch.stack([self.get(f"{prefix}.{e}.down_proj.weight") for e in range(num_experts)])
        return w13, w2

    def embeddings(self, tied: bool) -> tuple[Tensor, Tensor]:
        embed = self.get("model.embed_tokens.weight")
        head = embed if tied or not self.has("lm_head.weight") else self.get("lm_head.weight")
        return embed, head


def load_config(model_dir: str | Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model: cannot read {Path(model_dir) / 'config.json'}: {e}") from e


def resolve_dtype(config, dtype: str) -> torch.dtype:
    from omniops.serving.config import DTYPES

    if dtype == "auto":
        d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(d, str):
            d = DTYPES.get(d, torch.float32)
        return d if d in DTYPES.values() else torch.float32
    return DTYPES[dtype]
