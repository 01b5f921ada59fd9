"""Graph rewrite ``quant_linear``: activation quantization + quantized GEMM -> one fused omni op.

``QuantLinear`` (and any code calling the helpers) runs ``quantize_activation_per_token_int8`` /
``quantize_activation_fp8_group`` and then ``omni::w8a8_gemm`` / ``omni::fp8_block_gemm``. Under torch.compile the
helpers trace to their torch-op form (``omniops.quant.formats``), which reaches the post-grad graph as:

* int8: ``s = amax(|xf|, -1, keepdim) / 127``; ``q = int8(clamp(round(xf / where(s == 0, 1, s)), -127, 127))``
* fp8:  ``g = reshape(pad(xf), [..., K/128, 128])``; ``s = amax(|g|, -1) / 448``;
  ``q = fp8(slice(reshape(clamp(g / where(s == 0, 1, s)[..., None], -448, 448)), :K))``

with ``xf = x`` (fp32) or ``convert(x, fp32)``, and ``pad`` a ``slice_scatter`` into zeros when K % 128 != 0.
A GEMM fed by exactly that (codes as x_q, the same ``s`` as x_scale) becomes ``omni::w8a8_linear`` /
``omni::fp8_block_linear(x, w_q, w_scale, bias, out_dtype)``, which quantize inside the kernel call with the
same arithmetic. Anything else (another divisor, no rounding, other clamps, other scale) is left alone.
Hand-written matcher: the chain's shape constants (keepdim, group reshapes, padding) vary with K and the
number of leading dims, which fixed-shape pattern tracing would have to enumerate.
"""

from __future__ import annotations

from typing import Any

import torch
from omniops.graph_passes.config import PassConfig
from omniops.graph_passes.fx_utils import is_call, meta_val, splice
from omniops.graph_passes.report import PassReport

aten = torch.ops.aten
prims = torch.ops.prims
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _skip_clone(n: Any) -> Any:
    while is_call(n, aten.clone.default):
        n = n.args[0]
    return n


def _convert(n: Any, dtype: torch.dtype) -> Any:
    """The input of ``convert_element_type(input, dtype)`` / ``_to_copy(input, dtype=dtype)``, else None."""
    if is_call(n, prims.convert_element_type.default) and n.args[1] == dtype:
        return n.args[0]
    if is_call(n, aten._to_copy.default) and n.kwargs.get("dtype") == dtype and len(n.args) == 1:
        return n.args[0]
    return None


def _last_dim(dims: Any, ndim: int) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, ndim - 1)


def _const(x: Any, value: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and float(x) == value


def _clamped(n: Any, lo: float, hi: float) -> Any:
    """The input of clamp(input, lo, hi) in its decomposed (clamp_min -> clamp_max) or whole form, else None."""
    if is_call(n, aten.clamp_max.default) and _const(n.args[1], hi):
        m = n.args[0]
        if is_call(m, aten.clamp_min.default) and _const(m.args[1], lo):
            return m.args[0]
    if is_call(n, aten.clamp.default) and len(n.args) == 3 and _const(n.args[1], lo) and _const(n.args[2], hi):
        return n.args[0]
    return None


def _is_one(n: Any) -> bool:
    if is_call(n, aten.full.default):
        return _const(n.args[1], 1.0)
    if is_call(n, aten.ones_like.default):
        return True
    if is_call(n, aten.full_like.default):
        return _const(n.args[1], 1.0)
    return _const(n, 1.0)


def _safe_of(n: Any) -> Any:
    """``s`` of ``where(s == 0, 1, s)`` (formats._safe), else None."""
    if not is_call(n, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        return None
    cond, one, s = n.args
    if is_call(cond, aten.eq.Scalar) and cond.args[0] is s and _const(cond.args[1], 0.0) and _is_one(one):
        return s
    return None


def _float_source(xf: Any) -> Any:
    """The activation x behind ``xf = x.float()``: x itself if fp32, the input of the cast if fp16/bf16."""
    v = meta_val(xf)
    if v is None or v.dtype != torch.float32:
        return None
    src = _convert(xf, torch.float32)
    if src is not None and meta_val(src) is not None and meta_val(src).dtype in _FLOATS:
        return src
    return xf


def _amax_scale(s: Any, xf: Any, divisor: float, keepdim: bool) -> bool:
    """``s == amax(|xf|, -1, keepdim) / divisor``."""
    if not (is_call(s, aten.div.Tensor) and _const(s.args[1], divisor)):
        return False
    amax = s.args[0]
    if not (is_call(amax, aten.amax.default) and is_call(amax.args[0], aten.abs.default)
            and amax.args[0].args[0] is xf):
        return False
    nd = meta_val(xf).dim()
    kd = amax.args[2] if len(amax.args) > 2 else amax.kwargs.get("keepdim", False)
    return _last_dim(amax.args[1], nd) and bool(kd) == keepdim


# ---- int8 per token -------------------------------------------------------------------------------------------
def _match_int8(gemm: torch.fx.Node) -> Any:
    """x for a w8a8_gemm whose x_q, x_scale come from the per-token int8 formula, else None."""
    x_q, x_scale = _skip_clone(gemm.args[0]), _skip_clone(gemm.args[1])
    r = _clamped(_convert(x_q, torch.int8), -127.0, 127.0)
    if not is_call(r, aten.round.default):
        return None
    d = r.args[0]
    if not (is_call(d, aten.div.Tensor) and _safe_of(d.args[1]) is x_scale):
        return None
    xf = d.args[0]
    if meta_val(xf) is None or meta_val(xf).dim() < 1 or not _amax_scale(x_scale, xf, 127.0, keepdim=True):
        return None
    return _float_source(xf)


# ---- fp8 per token per 128 --------------------------------------------------------------------------------------
def _unpadded(xf: Any, k: int) -> Any:
    """``xf`` [..., K'] fp32 -> the [..., K] tensor it holds: ``slice_scatter(zeros, src, -1, 0, K)`` (padding to
    a multiple of 128) or xf itself when K' == K."""
    if is_call(xf, aten.slice_scatter.default):
        base, src = xf.args[0], xf.args[1]
        dim, start, end = (list(xf.args[2:5]) + [None, None, None])[:3]
        nd = meta_val(xf).dim()
        if not (is_call(base, aten.full.default) and _const(base.args[1], 0.0) and dim in (-1, nd - 1)
                and start in (0, None) and end == k):
            return None
        if is_call(src, aten.copy.default):  # copy(slice(zeros), src) after functionalisation: the value is src
            src = src.args[1]
        return src if meta_val(src) is not None and meta_val(src).shape[-1] == k else None
    return xf if meta_val(xf).shape[-1] == k else None


def _match_fp8(gemm: torch.fx.Node) -> Any:
    x_q, x_scale = _skip_clone(gemm.args[0]), _skip_clone(gemm.args[1])
    q = _convert(x_q, torch.float8_e4m3fn)
    qv = meta_val(x_q)
    if q is None or qv is None:
        return None
    k = qv.shape[-1]
    if is_call(q, aten.slice.Tensor):  # [..., :K] of the padded codes
        dim, start, end = (list(q.args[1:4]) + [None, None, None])[:3]
        if dim not in (-1, qv.dim() - 1) or start not in (0, None) or end != k:
            return None
        q = q.args[0]
    if not is_call(q, aten.reshape.default, aten.view.default):
        return None
    c = _clamped(q.args[0], -448.0, 448.0)
    if not is_call(c, aten.div.Tensor):
        return None
    g, den = c.args
    if not (is_call(den, aten.unsqueeze.default) and den.args[1] in (-1, meta_val(g).dim() - 1)):
        return None
    if _safe_of(den.args[0]) is not x_scale:
        return None
    gv = meta_val(g)
    if gv is None or gv.dim() < 2 or gv.shape[-1] != 128 or not _amax_scale(x_scale, g, 448.0, keepdim=False):
        return None
    if not is_call(g, aten.reshape.default, aten.view.default):
        return None
    xf = g.args[0]
    if meta_val(xf) is None or meta_val(xf).dim() != gv.dim() - 1:
        return None
    src = _unpadded(xf, k)
    return None if src is None else _float_source(src)


def _linear_fn(op: Any, has_bias: bool, out_dtype: torch.dtype):
    if has_bias:
        def fn(x, w, ws, b):
            return op(x, w, ws, b, out_dtype)
    else:
        def fn(x, w, ws):
            return op(x, w, ws, None, out_dtype)
    return fn


def quantized_gemms(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, bool]]:
    """(GEMM node, is_fp8) for every omni w8a8_gemm / fp8_block_gemm in ``graph``."""
    omni = torch.ops.omni
    return [(n, n.target is omni.fp8_block_gemm.default) for n in graph.nodes
            if is_call(n, omni.w8a8_gemm.default, omni.fp8_block_gemm.default)]


def quant_linear_pass(graph: torch.fx.Graph, rep: PassReport, cfg: PassConfig) -> None:
    omni = torch.ops.omni
    for gemm, fp8 in quantized_gemms(graph):
        args = list(gemm.args) + [gemm.kwargs.get("bias"), gemm.kwargs.get("out_dtype")][len(gemm.args) - 4:]
        bias, out_dtype = args[4], args[5]
        if out_dtype not in _FLOATS:  # int32: the raw-accumulator debug form has no fused counterpart
            continue
        x = _match_fp8(gemm) if fp8 else _match_int8(gemm)
        if x is None:
            continue
        op = omni.fp8_block_linear.default if fp8 else omni.w8a8_linear.default
        inputs = [x, args[2], args[3]] + ([bias] if bias is not None else [])
        (new,) = splice(graph, gemm, _linear_fn(op, bias is not None, out_dtype), inputs)
        gemm.replace_all_uses_with(new)
        graph.erase_node(gemm)
        rep.add("quant_linear")


def separate_quantizations(graph: torch.fx.Graph) -> int:
    """Quantized GEMMs left whose codes are computed in the graph (not a graph input): fusable ones missed."""
    return sum(1 for gemm, _ in quantized_gemms(graph)
               if isinstance(gemm.args[0], torch.fx.Node) and gemm.args[0].op == "call_function")
