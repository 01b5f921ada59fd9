"""Shared pieces of the placement planners: argument checks, conversions, load metrics.

Planners work in numpy float64 on the host: weights are a few hundred KB and the algorithms are loops of small
vectorised steps over layers, where numpy's per-call overhead is lower than torch's.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def as_numpy(name: str, x: object) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: expected a tensor or array, got {type(x).__name__}") from exc


def check_weight(weight: object, name: str = "weight") -> np.ndarray:
    """[L, E] non-negative finite loads -> float64 array."""
    w = as_numpy(name, weight)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [layers, experts] array, got shape {list(w.shape)}")
    if w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one layer and one expert, got shape {list(w.shape)}")
    if w.dtype == np.bool_ or not (np.issubdtype(w.dtype, np.number)):
        raise ValueError(f"{name}: expected a numeric array, got dtype {w.dtype}")
    w = w.astype(np.float64, copy=False)
    if not np.isfinite(w).all():
        raise ValueError(f"{name}: loads must be finite (found NaN or inf)")
    if (w < 0).any():
        raise ValueError(f"{name}: loads must be non-negative")
    return w


def check_int(name: str, v: object, *, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name}: expected an int, got {type(v).__name__}")
    v = int(v)
    if v < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {v}")
    return v


def check_phy2log(phy2log: object, num_layers: int, num_experts: int, name: str = "phy2log") -> np.ndarray:
    """[L, R] logical id per physical slot, every expert present in every layer -> int64 array."""
    p = as_numpy(name, phy2log)
    if p.ndim != 2 or p.shape[0] != num_layers:
        raise ValueError(f"{name}: expected shape [{num_layers}, num_replicas], got {list(p.shape)}")
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"{name}: expected an integer array, got dtype {p.dtype}")
    p = p.astype(np.int64, copy=False)
    if p.shape[1] < num_experts:
        raise ValueError(f"{name}: {p.shape[1]} slots cannot hold {num_experts} experts")
    if p.min() < 0 or p.max() >= num_experts:
        raise ValueError(f"{name}: expert ids must lie in [0, {num_experts}), got [{p.min()}, {p.max()}]")
    cnt = logical_counts(p, num_experts)
    missing = np.argwhere(cnt == 0)
    if len(missing):
        layer, expert = missing[0]
        raise ValueError(f"{name}: expert {expert} has no slot in layer {layer}")
    return p


def logical_counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] number of physical copies of each logical expert."""
    num_layers = phy2log.shape[0]
    flat = phy2log + (np.arange(num_layers, dtype=np.int64) * num_experts)[:, None]
    return np.bincount(flat.ravel(), minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def build_log2phy(phy2log: np.ndarray, num_experts: int, max_copies: int) -> np.ndarray:
    """[L, E, max_copies] physical slots of each expert in ascending slot order, padded with -1."""
    num_layers, num_slots = phy2log.shape
    # Unique keys (expert, slot): an unstable sort gives the stable order, and is faster.
    order = np.argsort(phy2log * num_slots + np.arange(num_slots), axis=1)
    experts_sorted = np.take_along_axis(phy2log, order, axis=1)
    cnt = logical_counts(phy2log, num_experts)
    first = np.cumsum(cnt, axis=1) - cnt  # position of each expert's first slot in `order`
    rank = np.arange(num_slots)[None, :] - np.take_along_axis(first, experts_sorted, axis=1)
    flat = ((np.arange(num_layers)[:, None] * num_experts + experts_sorted) * max_copies + rank).ravel()
    out = np.full(num_layers * num_experts * max_copies, -1, dtype=np.int64)
    out[flat] = order.ravel()
    return out.reshape(num_layers, num_experts, max_copies)


def gpu_loads(weight: ArrayLike, phy2log: ArrayLike, num_gpus: int) -> np.ndarray:
    """[L, G] load of each GPU: an expert's tokens are spread evenly over its copies."""
    w = np.asarray(as_numpy("weight", weight), dtype=np.float64)
    p = np.asarray(as_numpy("phy2log", phy2log), dtype=np.int64)
    cnt = logical_counts(p, w.shape[1])
    per_copy = w / np.maximum(cnt, 1)
    slot = np.take_along_axis(per_copy, p, axis=1)
    return slot.reshape(p.shape[0], num_gpus, -1).sum(-1)


def imbalance(loads: np.ndarray) -> np.ndarray:
    """[L] max/mean of GPU loads per layer (1.0 for an idle layer)."""
    mean = loads.mean(-1)
    return np.where(mean > 0, loads.max(-1) / np.where(mean > 0, mean, 1.0), 1.0)


def placement_imbalance(weight: ArrayLike, phy2log: ArrayLike, num_gpus: int) -> float:
    """Imbalance (max GPU load / mean GPU load) averaged over layers."""
    return float(imbalance(gpu_loads(weight, phy2log, num_gpus)).mean())


def slots_moved(old: ArrayLike, new: ArrayLike) -> np.ndarray:
    """[L] slots whose logical expert changed (each one is an expert's weights copied to that slot)."""
    return (np.asarray(as_numpy("old", old)) != np.asarray(as_numpy("new", new))).sum(-1)
