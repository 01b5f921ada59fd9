"""Checks of the expert-parallel engine options (``EngineConfig.ep`` and friends), kept import-light: the engine
config calls ``check_ep_options`` on every construction, EP or not."""

from __future__ import annotations

import math

PLACEMENTS = ("off", "static", "dynamic")


def _positive_int(name: str, v: object, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")
    return v


def check_ep_options(cfg) -> None:
    """Raise ValueError naming the field when an expert-parallel option is invalid or unsupported."""
    ep = _positive_int("ep", cfg.ep)
    _positive_int("redundant_experts", cfg.redundant_experts, minimum=0)
    if cfg.placement not in PLACEMENTS:
        raise ValueError(f"placement: expected one of {PLACEMENTS}, got {cfg.placement!r}")
    _positive_int("placement_interval", cfg.placement_interval)
    if cfg.placement_max_moves is not None:
        _positive_int("placement_max_moves", cfg.placement_max_moves)
    nodes = _positive_int("placement_nodes", cfg.placement_nodes)
    if not isinstance(cfg.ep_timeout, (int, float)) or isinstance(cfg.ep_timeout, bool) or not cfg.ep_timeout > 0:
        raise ValueError(f"ep_timeout: expected a positive number of seconds, got {cfg.ep_timeout!r}")
    if ep == 1:
        if cfg.redundant_experts or cfg.placement != "off" or nodes != 1:
            raise ValueError("redundant_experts / placement / placement_nodes: need ep > 1 (expert parallelism)")
        return
    if ep % nodes:
        raise ValueError(f"placement_nodes: ep={ep} ranks do not split into {nodes} equal nodes")


def default_max_moves(num_slots: int) -> int:
    """Slot changes per layer and update when not given: ~10% of the slots (EPLB-sized budgets in the placement
    simulator), at least 2 so that one swap fits."""
    return max(2, math.ceil(num_slots / 10))
