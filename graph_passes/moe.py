"""Graph rewrites of HF MoE blocks onto ``omni::moe_route`` and ``omni::fused_moe``.

Hand-written FX matchers (the experts form has ~25 nodes with data-dependent shapes and two outputs of a
sort, which register_replacement's fixed-shape tracing cannot express):

* routers (softmax top-k, DeepSeek-V3's grouped sigmoid router) -> ``moe_route``: ``graph_passes/router.py``.
* experts: transformers' ``grouped_mm_experts_forward`` as it reaches the post-grad graph (sort by expert,
  gather, grouped_mm(gate_up) -> silu(gate) * up -> grouped_mm(down), weight, unsort, sum over k), with
  ``torch.ops.transformers.grouped_mm_fallback`` (fp32/fp16 under compile) or ``aten._grouped_mm`` (bf16)
  -> ``fused_moe(hidden, gate_up_proj, down_proj, topk_weights, topk_ids)``.

HF's eager experts loop (``experts_implementation="eager"``) is a Python loop over the hit experts with
data-dependent shapes: Dynamo graph-breaks there, so no graph pattern can see it; ``prepare(model)`` is the
route for it. Replacements are traced with ``fwd_only`` under the graph's fake mode and spliced in.
"""

from __future__ import annotations

from typing import Any

import torch
from omniops.graph_passes.config import PassConfig
from omniops.graph_passes.fx_utils import (
    getitem_index,
    getitem_source,
    is_call,
    splice,
    strip_casts,
)
from omniops.graph_passes.report import PassReport
from omniops.graph_passes.router import route_pass

from omniops.ops.moe import fused_moe

aten = torch.ops.aten


WHY_EXPERTS_LEFT = "experts form not recognised (bias, transposed weights, other activation or expert parallelism)"


def grouped_mm_targets() -> list[Any]:
    """The grouped GEMMs HF's experts reach the post-grad graph as (whichever this torch / transformers has)."""
    out = []
    tf = getattr(torch.ops, "transformers", None)
    if tf is not None and hasattr(tf, "grouped_mm_fallback"):
        out.append(tf.grouped_mm_fallback.default)
    if hasattr(torch.ops.aten, "_grouped_mm"):
        out.append(torch.ops.aten._grouped_mm.default)
    return out


# ---- experts ---------------------------------------------------------------------------------------------------
def _gmm_args(n: torch.fx.Node) -> tuple[Any, Any, Any]:
    a = list(n.args)
    offs = a[2] if len(a) > 2 else n.kwargs.get("offs")
    return a[0], a[1], offs


def _weight_of(t: Any) -> Any:
    """``w`` for ``t = w.transpose(-2, -1)`` on a 3-D weight (HF's is_transposed=False layout), else None."""
    if is_call(t, aten.permute.default) and list(t.args[1]) == [0, 2, 1]:
        return t.args[0]
    if is_call(t, aten.transpose.int) and sorted(a % 3 for a in t.args[1:3]) == [1, 2]:
        return t.args[0]
    return None


def _is_silu_of(a: Any, g: Any) -> bool:
    """``a = silu(g)``: aten.silu, Inductor's ``g / (1 + exp(-g))`` or ``g * sigmoid(g)``; dtype casts of g allowed
    (half-precision experts compute it in fp32: ``convert(g, f32) / (1 + exp(-convert(g, f32)))``)."""
    def same(x: Any) -> bool:
        return strip_casts(x) is g

    if is_call(a, aten.silu.default):
        return same(a.args[0])
    if is_call(a, aten.div.Tensor) and same(a.args[0]):
        d = a.args[1]
        if is_call(d, aten.add.Tensor) and d.args[1] == 1 and is_call(d.args[0], aten.exp.default):
            neg = d.args[0].args[0]
            return is_call(neg, aten.neg.default) and same(neg.args[0])
    if is_call(a, aten.mul.Tensor):  # g * sigmoid(g)
        x, s = a.args
        return same(x) and is_call(s, aten.sigmoid.default) and same(s.args[0])
    return False


def _silu_mul_input(m: Any) -> Any:
    """``x`` for ``m = silu(x[..., :d]) * x[..., d:]`` (chunk -> split), else None."""
    m = strip_casts(m)
    if not is_call(m, aten.mul.Tensor):
        return None
    a, up = m.args
    up = strip_casts(up)
    src = getitem_source(up, 1)
    if src is None or not is_call(src, aten.split.Tensor, aten.split_with_sizes.default):
        return None
    gates = [u for u in src.users if getitem_index(u) == 0]
    if len(gates) != 1:
        return None
    gate = gates[0]
    a = strip_casts(a)
    if not (_is_silu_of(a, gate) or (is_call(a, aten.silu.default) and strip_casts(a.args[0]) is gate)):
        return None
    return src.args[0]


def _experts_pass(graph: torch.fx.Graph, rep: PassReport) -> None:
    targets = grouped_mm_targets()
    if not targets:
        return
    for g2 in list(graph.nodes):
        if not is_call(g2, *targets) or g2._erased:
            continue
        x2, w2t, offs = _gmm_args(g2)
        h = _silu_mul_input(x2)
        g1 = strip_casts(h) if h is not None else None
        if g1 is None or not is_call(g1, *targets) or _gmm_args(g1)[2] is not offs:
            continue
        x1, w13t, _ = _gmm_args(g1)
        w13, w2 = _weight_of(w13t), _weight_of(w2t)
        x1 = strip_casts(x1)
        # x1 = hidden[perm // k];  perm = sort(topk_ids.view(-1)).indices
        if w13 is None or w2 is None or not is_call(x1, aten.index.Tensor) or len(x1.args[1]) != 1:
            continue
        hidden, sel = x1.args[0], x1.args[1][0]
        if not (is_call(sel, aten.div.Tensor_mode) and sel.kwargs.get("rounding_mode") == "floor"):
            continue
        perm, k = sel.args
        srt = getitem_source(perm, 1)
        if srt is None or not is_call(srt, aten.sort.default) or not is_call(srt.args[0], aten.view.default,
                                                                      aten.reshape.default):
            continue
        topk_ids = srt.args[0].args[0]
        # out = (g2 * w_sorted[:, None])[inv_perm].view(T, k, H).sum(1)
        if len(g2.users) != 1:
            continue
        (mul,) = g2.users
        if not is_call(mul, aten.mul.Tensor) or len(mul.users) != 1:
            continue
        ws = mul.args[1] if mul.args[0] is g2 else mul.args[0]
        if is_call(ws, aten.unsqueeze.default):
            ws = ws.args[0]
        if not (is_call(ws, aten.index.Tensor) and ws.args[1][0] is perm and is_call(ws.args[0], aten.view.default,
                                                                             aten.reshape.default)):
            continue
        topk_weights = ws.args[0].args[0]
        (unsort,) = mul.users
        if not is_call(unsort, aten.index.Tensor) or len(unsort.users) != 1:
            continue
        (view,) = unsort.users
        if not is_call(view, aten.view.default, aten.reshape.default) or len(view.users) != 1:
            continue
        (total,) = view.users
        if not (is_call(total, aten.sum.dim_IntList) and list(total.args[1]) == [1]):
            continue
        hv, idv, wv = hidden.meta.get("val"), topk_ids.meta.get("val"), topk_weights.meta.get("val")
        if hv is None or idv is None or wv is None or hv.dim() != 2 or idv.dim() != 2 or idv.shape[1] != k:
            continue
        if w13.meta["val"].dtype != hv.dtype:
            continue

        def fn(hs, a, b, tw, ti):
            return fused_moe(hs, a, b, tw, ti, activation="silu")

        (out,) = splice(graph, total, fn, [hidden, w13, w2, topk_weights, topk_ids])
        total.replace_all_uses_with(out)
        rep.add("fused_moe")


def _ids_int32(graph: torch.fx.Graph) -> None:
    """fused_moe takes moe_route's int32 ids as they are: drop the int64 cast HF's experts needed."""
    for n in graph.nodes:
        if n.op != "call_function" or not str(n.target).startswith("omni.fused_moe"):
            continue
        names = [a.name for a in n.target._schema.arguments]
        if "topk_ids" not in names or names.index("topk_ids") >= len(n.args):
            continue
        ids = n.args[names.index("topk_ids")]
        if is_call(ids, torch.ops.prims.convert_element_type.default) and ids.args[1] == torch.int64:
            src = ids.args[0]
            if isinstance(src, torch.fx.Node) and getattr(src.meta.get("val"), "dtype", None) == torch.int32:
                n.replace_input_with(ids, src)


def moe_pass(graph: torch.fx.Graph, rep: PassReport, cfg: PassConfig) -> None:
    """Routers then experts (the experts matcher reads the routers' outputs)."""
    route_pass(graph, rep)
    _experts_pass(graph, rep)
    _ids_int32(graph)
    graph.eliminate_dead_code()
