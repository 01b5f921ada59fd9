"""Decode-sized dense linears -> ``omni::grouped_gemm`` with one group (CPU).

``F.linear(x, W)`` reaches the post-grad graph as ``mm(x, permute(W, [1, 0]))`` (``addmm`` with a bias). With
few rows (decode: one per sequence) the GEMM only streams the weight, and torch's CPU mm does that well below
the memory bandwidth on some CPUs (AMD EPYC, bench/RESULTS.md: fp32 ~9 GB/s, bf16 ~2.6 GB/s at 4 rows vs
~18 GB/s for the omni kernel, 1 thread). The omni grouped GEMM over a single "expert" ``W[None]`` is that
weight-streaming kernel. Rows are bounded by ``linear_max_rows`` (the compile-time hint of a symbolic row count):
prefill-sized fp32 GEMMs are compute-bound and stay with torch's BLAS. bf16 / fp16 linears are rewritten at any
row count on CPUs without AMX-BF16 / AVX512-BF16: there torch's 16-bit GEMMs are 3-7x slower than the omni
kernel at every size (measured 6.5-7.3x bf16, 3.0-3.5x fp16, M = 64..1024). An fp32 graph compiled at a small
batch keeps the omni GEMM when later called with more rows: measured 2.2x / 1.4x / 1.1x / 0.83x torch's mm at
16 / 32 / 64 / 256 rows (2048 x 2048, 2 threads), a mild slope rather than a cliff.

Those figures are from AMD EPYC. On other CPUs (Intel Xeon with AMX: oneDNN's bf16 GEMM is fast) the choice
is made by measurement: ``linear_measure`` (default on) asks ``omniops._calibrate`` which side wins for the
dtype and row count on this CPU and kernel library; the rule above is the fallback without a measurement.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from omniops.graph_passes.config import PassConfig
from omniops.graph_passes.fx_utils import is_call, meta_val, size_hint, splice
from omniops.graph_passes.report import PassReport

import omniops

aten = torch.ops.aten


def _weight(wt: Any) -> Any:
    """``W`` [N, K] for ``wt = permute(W, [1, 0])`` / ``W.t()``, else None."""
    if is_call(wt, aten.permute.default) and list(wt.args[1]) == [1, 0]:
        return wt.args[0]
    if is_call(wt, aten.t.default):
        return wt.args[0]
    return None


def _gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(2, device=x.device) * x.shape[0]  # one group: all rows
    return omniops.grouped_gemm(x, w.unsqueeze(0), offsets)


def _gemm_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _gemm(x, w) + b


@functools.cache
def _native_half_matmul() -> bool:
    """Whether torch's CPU matmul has native 16-bit units here (AMX-BF16 / AVX512-BF16). Without them (AVX2
    machines) its bf16 / fp16 GEMMs run 3-7x slower than the omni kernel at every size (bench/RESULTS.md)."""
    feats = omniops.cpu_info()["features"]
    return bool(feats.get("amx_bf16") or feats.get("avx512_bf16"))


def _omni_wins(dtype: torch.dtype, rows: int, max_rows: int, measure: bool) -> bool:
    """Rewrite this linear? Measured (omniops._calibrate, on this CPU and kernel library): at most max_rows rows
    when omni wins there, any row count when omni also wins at the largest measured size (the AVX2 bf16 case).
    Static rule (measure=False or no measurement): rows <= max_rows, any rows for 16-bit dtypes without native
    16-bit matmul units."""
    from omniops import _calibrate

    if measure:
        at_rows = _calibrate.omni_linear_wins(dtype, rows)
        if at_rows is not None:
            return at_rows and (rows <= max_rows or bool(_calibrate.omni_linear_wins(dtype, 1 << 30)))
    half_slow = dtype != torch.float32 and not _native_half_matmul()
    return rows <= max_rows or half_slow


def linear_pass(graph: torch.fx.Graph, rep: PassReport, cfg: PassConfig) -> None:
    if "cpu" not in omniops.available_backends("cpu"):  # no omni CPU GEMM kernel to move the linears to
        rep.miss("linear", "omniops._C is not built")
        return
    for node in list(graph.nodes):
        if is_call(node, aten.mm.default):
            x, wt, bias = node.args[0], node.args[1], None
        elif is_call(node, aten.addmm.default) and not node.kwargs:
            bias, x, wt = node.args[:3]
        else:
            continue
        w = _weight(wt)
        xv, wv = meta_val(x), meta_val(w)
        if xv is None or wv is None or xv.device.type != "cpu" or xv.dtype not in (torch.float32, torch.bfloat16,
                                                                                    torch.float16):
            continue
        if wv.dtype != xv.dtype or wv.dim() != 2 or not wv.is_contiguous():
            continue
        rows = size_hint(xv.shape[0])
        if rows is None or not _omni_wins(xv.dtype, rows, cfg.linear_max_rows, cfg.linear_measure):
            continue
        if bias is not None:
            bv = meta_val(bias)
            if bv is None or bv.dtype != xv.dtype or bv.dim() != 1:
                continue
        args = [x, w] + ([bias] if bias is not None else [])
        (out,) = splice(graph, node, _gemm_bias if bias is not None else _gemm, args)
        node.replace_all_uses_with(out)
        rep.add("linear")
    graph.eliminate_dead_code()
