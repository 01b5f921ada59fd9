"""Hugging Face transformers as the oracle: greedy ``generate`` one prompt at a time (no padding effects)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def hf_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.inference_mode()
def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int, dtype: torch.dtype = torch.float32) -> list[int]:
    """Greedy tokens as HF's ``generate`` makes them (stopping at the checkpoint's EOS ids)."""
    ids = torch.tensor([prompt_ids])
    out = hf_model(path, dtype).generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@torch.inference_mode()
def hf_logits(path: str, ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return hf_model(path, dtype)(torch.tensor([ids])).logits[0].float()
