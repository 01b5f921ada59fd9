"""Shared strategies for the placement tests: small shapes so that the suite stays fast on 2 cores."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


@st.composite
def layouts(draw, hierarchical: bool | None = None):
    """(E, R, num_groups, num_nodes, num_gpus) valid for rebalance_experts."""
    num_nodes = draw(st.sampled_from([1, 2, 3]))
    gpus_per_node = draw(st.integers(1, 3))
    num_gpus = num_nodes * gpus_per_node
    hier = draw(st.booleans()) if hierarchical is None else hierarchical
    if hier:
        num_groups = num_nodes * draw(st.integers(1, 3))
    else:
        num_groups = draw(st.sampled_from([g for g in (1, 2, 3, 4, 5) if num_nodes == 1 or g % num_nodes]))
    group_size = draw(st.integers(1, 4))
    num_experts = num_groups * group_size
    per_gpu_min = -(-num_experts // num_gpus)
    per_gpu = per_gpu_min + draw(st.integers(0, 3))
    return num_experts, per_gpu * num_gpus, num_groups, num_nodes, num_gpus


@st.composite
def loads(draw, num_layers: int, num_experts: int):
    """[L, E] loads: random, Zipf-like, zeros, one hot expert, or ties."""
    kind = draw(st.sampled_from(["random", "zipf", "zeros", "one", "ties"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random((num_layers, num_experts)) * 100
    if kind == "zipf":
        s = rng.uniform(0.2, 1.5, (num_layers, 1))
        ranks = np.argsort(rng.random((num_layers, num_experts)), axis=1) + 1
        return 1000.0 / ranks**s
    if kind == "zeros":
        return np.zeros((num_layers, num_experts))
    if kind == "one":
        w = np.zeros((num_layers, num_experts))
        w[np.arange(num_layers), rng.integers(0, num_experts, num_layers)] = 500.0
        return w
    return np.full((num_layers, num_experts), 7.0)
