"""Inductor pattern-matcher replacements onto omni ops (norm and activation families).

Patterns are traced with ``fwd_only`` (Inductor's own decompositions, so they look like the post-grad graph)
once per dtype: HF's RMSNorm casts to fp32 and back, and those casts vanish for fp32 inputs, so each dtype
gives a different graph. ``eps`` is a free scalar (``scalar_workaround``); ``extra_check`` rejects matches
whose dtypes or shapes the omni op would treat differently, or that have fewer rows than the config's
``min_rows`` (the checks are registered per ``min_rows`` value, so a compile's config reaches them without
any global). Each pass is its own ``PatternMatcherPass`` so it can be switched off and counted; they run
longest pattern first (residual add + RMSNorm before RMSNorm).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from omniops.graph_passes.config import PassConfig
from omniops.graph_passes.report import PassReport
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, fwd_only, register_replacement

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EPS = 1e-6  # placeholder value for tracing; matched as a free scalar


NAMES = ("fused_add_rms_norm", "rms_norm", "silu_and_mul", "silu_and_mul_split")  # longest pattern first


def rows_ok(x, min_rows: int) -> bool:
    """False for a CPU tensor with fewer rows than ``min_rows`` (symbolic sizes: their hint)."""
    if min_rows <= 0 or x.device.type != "cpu":
        return True
    rows = 1
    for d in x.shape[:-1]:
        rows *= d if isinstance(d, int) else (d.node.hint if d.node.hint is not None else min_rows)
    return rows >= min_rows


def _val(match: Match, name: str):
    node = match.kwargs[name]
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm / Qwen3MoeRMSNorm / DeepseekV3RMSNorm / MixtralRMSNorm, verbatim
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


# ---- residual add + RMSNorm ----------------------------------------------------------------------------------
def _add_rms_pattern(x, residual, weight, eps):
    s = residual + x
    return _hf_rms_norm(s, weight, eps), s


def _add_rms_replace(x, residual, weight, eps):
    out, s = torch.ops.omni.fused_add_rms_norm.default(x, residual, weight, eps)
    return out, s


# ---- RMSNorm ------------------------------------------------------------------------------------------------
def _rms_pattern(x, weight, eps):
    return _hf_rms_norm(x, weight, eps)


def _rms_replace(x, weight, eps):
    return torch.ops.omni.rms_norm.default(x, weight, eps)


def _norm_check(dtype: torch.dtype, with_residual: bool, min_rows: int) -> Callable[[Match], bool]:
    def check(match: Match) -> bool:
        x, w = _val(match, "x"), _val(match, "weight")
        if x is None or w is None or x.dtype != dtype or w.dtype != dtype or w.dim() != 1 or x.dim() < 1:
            return False
        if x.shape[-1] != w.shape[0] or not rows_ok(x, min_rows):
            return False
        if with_residual:
            r = _val(match, "residual")
            if r is None or r.dtype != dtype or r.shape != x.shape:
                return False
        eps = match.kwargs.get("eps")
        return isinstance(eps, (int, float)) and eps >= 0
    return check


# ---- SiLU-and-mul ---------------------------------------------------------------------------------------------
def _silu_merged_pattern(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _silu_merged_replace(x):
    return torch.ops.omni.silu_and_mul.default(x)


def _silu_split_pattern(gate, up):
    return F.silu(gate) * up


def _silu_split_replace(gate, up):
    return torch.ops.omni.silu_and_mul.default(torch.cat([gate, up], dim=-1))


def _silu_merged_check(dtype: torch.dtype, min_rows: int) -> Callable[[Match], bool]:
    def check(match: Match) -> bool:
        x = _val(match, "x")
        return (x is not None and x.dtype == dtype and x.dim() >= 1 and x.shape[-1] % 2 == 0
                and rows_ok(x, min_rows))
    return check


def _silu_split_check(dtype: torch.dtype, min_rows: int) -> Callable[[Match], bool]:
    def check(match: Match) -> bool:
        g, u = _val(match, "gate"), _val(match, "up")
        return (g is not None and u is not None and g.dtype == dtype == u.dtype and g.shape == u.shape
                and rows_ok(g, min_rows))
    return check


# ---- registration ---------------------------------------------------------------------------------------------
@functools.cache
def pattern_passes(min_rows: int) -> dict[str, PatternMatcherPass]:
    """name -> PatternMatcherPass for a config's ``min_rows``, registered once per value (traced with small real
    tensors, outside any fake mode: call it before the compile, as ``omni_backend`` does)."""
    import omniops  # noqa: F401  (registers the omni custom ops the replacements call)

    passes = {name: PatternMatcherPass(pass_name=f"omni_{name}") for name in NAMES}
    for dt in DTYPES:
        x, r, w = torch.empty(2, 8, dtype=dt), torch.empty(2, 8, dtype=dt), torch.empty(8, dtype=dt)
        register_replacement(_add_rms_pattern, _add_rms_replace, [x, r, w, _EPS], fwd_only,
                             passes["fused_add_rms_norm"], extra_check=_norm_check(dt, True, min_rows),
                             scalar_workaround={"eps": _EPS})
        register_replacement(_rms_pattern, _rms_replace, [x, w, _EPS], fwd_only, passes["rms_norm"],
                             extra_check=_norm_check(dt, False, min_rows), scalar_workaround={"eps": _EPS})
        register_replacement(_silu_merged_pattern, _silu_merged_replace, [torch.empty(2, 16, dtype=dt)], fwd_only,
                             passes["silu_and_mul"], extra_check=_silu_merged_check(dt, min_rows))
        register_replacement(_silu_split_pattern, _silu_split_replace, [x, r], fwd_only,
                             passes["silu_and_mul_split"], extra_check=_silu_split_check(dt, min_rows))
    return passes


def pattern_pass(name: str) -> Callable[[torch.fx.Graph, PassReport, PassConfig], None]:
    """The pass ``name`` of this module in the backend's pass form."""
    def run(graph: torch.fx.Graph, rep: PassReport, cfg: PassConfig) -> None:
        n = pattern_passes(cfg.min_rows)[name].apply(graph)
        if n:
            rep.add(name, n)
    return run
