"""Synthetic expert-load traces for the placement simulator (``omni-bench placement``).

Each layer ranks its experts (a random permutation) and gives rank r a share proportional to ``1 / r**s``
(Zipf, skew ``s`` per layer). Drifting traces move that ranking over time: a few hot experts cool down and cold
ones heat up every step, plus short bursts where one expert spikes. Per-step counts carry Poisson noise, as
token counts from a finite batch do.
"""

from __future__ import annotations

import numpy as np


def layer_skews(num_layers: int, rng: np.random.Generator, lo: float = 0.2, hi: float = 1.5) -> np.ndarray:
    """[L] Zipf exponents, varying by layer (shallow layers tend to be flatter; here just random)."""
    return rng.uniform(lo, hi, num_layers)


def zipf_shares(ranking: np.ndarray, skew: np.ndarray) -> np.ndarray:
    """ranking [L, E] (expert at each rank), skew [L] -> [L, E] load shares summing to 1 per layer."""
    num_layers, num_experts = ranking.shape
    pop = 1.0 / np.arange(1, num_experts + 1)[None, :] ** np.asarray(skew, dtype=np.float64)[:, None]
    out = np.empty_like(pop)
    np.put_along_axis(out, ranking, pop, axis=1)
    return out / out.sum(1, keepdims=True)


def zipf_weights(
    num_layers: int, num_experts: int, skew: float | np.ndarray, rng: np.random.Generator, tokens: float = 1e5
) -> np.ndarray:
    """[L, E] expected loads of a static Zipf trace (``tokens`` per layer)."""
    skew = np.broadcast_to(np.asarray(skew, dtype=np.float64), (num_layers,))
    ranking = np.argsort(rng.random((num_layers, num_experts)), axis=1)
    return zipf_shares(ranking, skew) * tokens


def drifting_trace(
    num_layers: int,
    num_experts: int,
    steps: int,
    rng: np.random.Generator,
    *,
    tokens: float = 8192 * 8,
    swaps_per_step: int = 2,
    hot: int = 32,
    burst_prob: float = 0.02,
    burst_factor: float = 8.0,
    burst_len: int = 3,
    skew: np.ndarray | None = None,
) -> np.ndarray:
    """[steps, L, E] per-step token counts with drifting hot sets and bursts.

    Each step and layer, ``swaps_per_step`` experts among the ``hot`` top ranks trade ranks with random
    experts (a hot expert cools, a cold one heats up). With probability ``burst_prob`` a layer starts a burst:
    a random expert's load is multiplied by ``burst_factor`` for ``burst_len`` steps.
    """
    skew = layer_skews(num_layers, rng) if skew is None else np.asarray(skew, dtype=np.float64)
    ranking = np.argsort(rng.random((num_layers, num_experts)), axis=1)
    rows = np.arange(num_layers)
    burst_expert = np.zeros(num_layers, dtype=np.int64)
    burst_left = np.zeros(num_layers, dtype=np.int64)
    out = np.empty((steps, num_layers, num_experts))
    hot = min(hot, num_experts)
    for t in range(steps):
        if t:
            for _ in range(swaps_per_step):
                i = rng.integers(0, hot, num_layers)
                j = rng.integers(0, num_experts, num_layers)
                ranking[rows, i], ranking[rows, j] = ranking[rows, j], ranking[rows, i].copy()
        start = (burst_left == 0) & (rng.random(num_layers) < burst_prob)
        burst_expert = np.where(start, rng.integers(0, num_experts, num_layers), burst_expert)
        burst_left = np.where(start, burst_len, burst_left)
        share = zipf_shares(ranking, skew)
        on = burst_left > 0
        share[rows[on], burst_expert[on]] *= burst_factor
        share /= share.sum(1, keepdims=True)
        burst_left = np.maximum(burst_left - 1, 0)
        out[t] = rng.poisson(share * tokens)
    return out


# The load in service is seldom the load a placement was planned for: the kinds of change below turn the load of
# the plan (``w_old``) into the load of the next window, for planners that start from the placement in service.
SHIFTS = ("drift", "rerank", "groups", "groups+drift")


def shifted_load(
    w_old: np.ndarray, kind: str, rng: np.random.Generator, *, num_groups: int = 8, hot: int = 32, swaps: int = 16,
    group_spread: float = 0.15,
) -> np.ndarray:
    """[L, E] load after a change of ``kind`` (same total per layer):

    * ``drift``: ``swaps`` experts among the ``hot`` heaviest trade loads with random experts (a hot set moving);
    * ``rerank``: a fresh random ranking of the same loads (a new workload, same skew);
    * ``groups``: every expert group's load scaled by a factor in ``1 +- group_spread`` (node totals drifting:
      what a hierarchical plan's group-to-node pairing cannot follow);
    * ``groups+drift``: both, half the spread and half the swaps.
    """
    num_layers, num_experts = w_old.shape
    rows = np.arange(num_layers)
    w = w_old.copy()
    if kind not in SHIFTS:
        raise ValueError(f"kind: expected one of {SHIFTS}, got {kind!r}")
    if kind == "rerank":
        w = np.take_along_axis(w_old, np.argsort(rng.random(w_old.shape), axis=1), axis=1)
    if kind in ("drift", "groups+drift"):
        order = np.argsort(-w_old, axis=1)
        for _ in range(swaps if kind == "drift" else swaps // 2):
            i = order[rows, rng.integers(0, min(hot, num_experts), num_layers)]
            j = rng.integers(0, num_experts, num_layers)
            w[rows, i], w[rows, j] = w[rows, j], w[rows, i].copy()
    if kind in ("groups", "groups+drift"):
        spread = group_spread if kind == "groups" else group_spread / 2
        f = rng.uniform(1 - spread, 1 + spread, (num_layers, num_groups))
        w = w * np.repeat(f, num_experts // num_groups, axis=1)
    return w * (w_old.sum(1, keepdims=True) / np.maximum(w.sum(1, keepdims=True), 1e-300))
