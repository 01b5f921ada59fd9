"""Options of the omni backend: which passes run, and logging.

Set globally with ``omniops.graph_passes.configure(...)`` or per compile with
``torch.compile(model, backend="omni", options={...})`` (per-compile options win).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class PassConfig:
    # residual add + RMSNorm -> omni::fused_add_rms_norm (returns normed and the sum)
    fused_add_rms_norm: bool = True
    # HF RMSNorm (fp32 statistics, cast back, times weight) -> omni::rms_norm
    rms_norm: bool = True
    # silu(gate) * up where gate, up = chunk(gate_up) (merged projection, HF experts) -> omni::silu_and_mul
    silu_and_mul: bool = True
    # silu(gate(x)) * up(x) with two separate projections -> silu_and_mul(cat(gate, up)). Off by default: the
    # cat costs one more pass over the activations and Inductor already fuses silu*mul into one loop.
    silu_and_mul_split: bool = False
    # router softmax + top-k (+ renormalisation) -> omni::moe_route; grouped_mm experts -> omni::fused_moe
    moe: bool = True
    # CPU: dense linears with at most linear_max_rows rows (decode) -> omni::grouped_gemm over one group (torch's
    # mm streams a weight at well below the memory bandwidth at few rows on some CPUs; see graph_passes/linear.py).
    # bf16 / fp16 linears at any row count when the CPU has no AMX-BF16 / AVX512-BF16 (torch's are 3-7x slower).
    linear: bool = True
    linear_max_rows: int = 16
    # decide each linear by a startup measurement of omni vs torch on this CPU (omniops._calibrate); False: the
    # static rule above (what the structure tests use, since the measured answer depends on the machine)
    linear_measure: bool = True
    # SDPA (CPU) and HF's eager matmul-softmax-matmul attention, repeat_kv GQA stripped -> omni::gqa_attention
    attention: bool = True
    # HF rotary embedding (q * cos + rotate_half(q) * sin, q and k sharing cos/sin) -> omni::rotary_embedding on
    # the token-major q/k (no copy). On by default: rotary region of a Llama layer (8/2 heads x 128, fp32, 2
    # threads) 0.33 ms vs Inductor's 0.46-0.50 ms at 4x64 tokens, equal at 1x128 (Inductor recomputes cos/sin
    # for every head and materialises rotate_half's cat); decode sizes fall under min_rows (the op's fixed
    # ~0.1 ms extra would lose there).
    rotary: bool = True
    # quantize_activation_{per_token_int8,fp8_group} + omni w8a8_gemm / fp8_block_gemm -> omni::w8a8_linear /
    # omni::fp8_block_linear (QuantLinear's two steps as one call)
    quant_linear: bool = True
    # CPU only: leave norms / SiLU-and-mul with fewer rows (tokens) than this to Inductor's own fused loops. A
    # compiled graph calls an omni op through the dispatcher and its Python wrapper (~0.1-0.3 ms here), more
    # than the whole fused loop costs at decode sizes; at prefill sizes both run at memory speed. Symbolic
    # sizes use their compile-time hint (decode graphs specialise the sequence length to 1). 0: always rewrite.
    min_rows: int = 64
    # keep Inductor's FX graph / AOT caches on. Off by default: a cache hit skips our passes, so the report
    # would not see the matches of a cached graph (the cache key includes our pass sources and this config).
    cache: bool = False
    # print the pass report after each compiled graph (also on with OMNI_LOG=passes)
    log: bool = False

    def replace(self, **kw: Any) -> PassConfig:
        _check(kw)
        return replace(self, **kw)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_GLOBAL = PassConfig()


def _check(kw: dict[str, Any]) -> None:
    known = {f.name for f in fields(PassConfig)}
    for k, v in kw.items():
        if k not in known:
            raise ValueError(f"omni backend: unknown option {k!r}; known: {sorted(known)}")
        want = int if k in ("min_rows", "linear_max_rows") else bool
        if not isinstance(v, want) or (want is int and (isinstance(v, bool) or v < 0)):
            raise TypeError(f"omni backend: option {k!r} expects a {'non-negative int' if want is int else 'bool'}, "
                            f"got {v!r}")


def configure(**kw: bool | int) -> PassConfig:
    """Set the global defaults of the omni backend, e.g. ``configure(rms_norm=False, log=True)``.
    Returns the new config."""
    global _GLOBAL
    _GLOBAL = _GLOBAL.replace(**kw)
    return _GLOBAL


def current(options: dict[str, Any] | None = None) -> PassConfig:
    """The global config updated with per-compile ``options`` (unknown keys raise)."""
    cfg = _GLOBAL
    if options:
        cfg = cfg.replace(**dict(options))
    if "passes" in os.environ.get("OMNI_LOG", "").split(","):
        cfg = replace(cfg, log=True)
    return cfg
