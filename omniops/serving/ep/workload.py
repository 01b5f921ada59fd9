"""Skewed workloads for the expert-parallel tests and ``omni-bench ep``: prompts whose tokens route most of
their (token, expert) pairs to a few chosen experts.

How: one forward of every vocabulary token as its own 1-token sequence through the single-process model, with
each MoE layer's ``route`` wrapped to record its picks; tokens are ranked by the share of their picks (over all
MoE layers) that land on the hot experts, and prompts are random sequences of the best ones. In a random-weight
model a token's routing is dominated by its own embedding, so the skew survives the attention mixing of a
prompt (measured: ``routed_share``).
"""

from __future__ import annotations

import random

import torch

from omniops.serving.models import AttentionMetadata, build_model
from omniops.serving.models.base import FusedMoE

_CHUNK = 256  # sequences per forward (each owns one KV block; chunks reuse the same blocks)


def _routing(model, token_ids: list[int], block_size: int) -> list[torch.Tensor]:
    """Per MoE layer: the [len(token_ids), k] expert ids of each token alone at position 0."""
    moes = [layer["mlp"] for layer in model.layers if isinstance(layer["mlp"], FusedMoE)]
    picks: list[list[torch.Tensor]] = [[] for _ in moes]
    originals = [m.route for m in moes]

    def recording(j: int):
        def route(x: torch.Tensor):
            w, ids = originals[j](x)
            picks[j].append(ids)
            return w, ids
        return route

    for j, m in enumerate(moes):
        m.route = recording(j)
    try:
        with torch.inference_mode():
            for lo in range(0, len(token_ids), _CHUNK):
                chunk = token_ids[lo:lo + _CHUNK]
                n = len(chunk)
                table = torch.arange(n, dtype=torch.int32).view(n, 1)
                meta = AttentionMetadata(torch.zeros(n, dtype=torch.long), table.view(-1).long() * block_size,
                                         torch.arange(n + 1, dtype=torch.int32), table,
                                         torch.zeros(n, dtype=torch.int32), num_decode=0, prefill_context=[0] * n,
                                         prefill_query=[1] * n)
                model.forward(torch.tensor(chunk), meta)
    finally:
        for m, r in zip(moes, originals, strict=True):
            m.route = r
    return [torch.cat(p) for p in picks]


def hot_tokens(model_dir: str, hot_experts: list[int], num_tokens: int = 24, *, dtype: str = "float32",
               exclude: set[int] | None = None) -> tuple[list[int], float]:
    """The ``num_tokens`` vocabulary ids routed most to ``hot_experts``, and the mean share of their picks
    that hit them (as 1-token sequences)."""
    model, config = build_model(model_dir, dtype, max_positions=64)
    bs = 16
    model.allocate_kv(_CHUNK, bs)
    vocab = [t for t in range(config.vocab_size) if t not in (exclude or set())]
    per_layer = _routing(model, vocab, bs)
    hot = torch.tensor(sorted(hot_experts))
    share = torch.stack([torch.isin(ids, hot).float().mean(1) for ids in per_layer]).mean(0)
    top = torch.topk(share, num_tokens).indices
    return [vocab[i] for i in top.tolist()], float(share[top].mean())


def skewed_prompts(tokens: list[int], num_prompts: int, length: tuple[int, int] = (24, 48), seed: int = 0
                   ) -> list[list[int]]:
    """Random token-id prompts drawn from ``tokens`` (lengths uniform in ``length``)."""
    rnd = random.Random(seed)
    return [[rnd.choice(tokens) for _ in range(rnd.randint(*length))] for _ in range(num_prompts)]
