"""Graph rewrites of HF MoE blocks onto ``omni::moe_route`` and ``omni::fused_moe``.

Hand-written FX matchers (the experts form has ~25 nodes with data-dependent shapes and two outputs of a
sort, which register_replacement's fixed-shape tracing cannot express):

* router: ``topk(softmax(logits), k)`` [+ ``values / values.sum(-1, keepdim=True)``] (Qwen3-MoE, Mixtral)
  -> ``moe_route(logits, k, scoring="softmax", renormalize=...)``.
* experts: transformers' ``grouped_mm_experts_forward`` as it reaches the post-grad graph (sort by expert,
  gather, grouped_mm(gate_up) -> silu(gate) * up -> grouped_mm(down), weight, unsort, sum over k), with
  ``torch.ops.transformers.grouped_mm_fallback`` (fp32/fp16 under compile) or ``aten._grouped_mm`` (bf16)
  -> ``fused_moe(hidden, gate_up_proj, down_proj, topk_weights, topk_ids)``.

HF's eager experts loop (``experts_implementation="eager"``) is a Python loop over the hit experts with
data-dependent shapes: Dynamo graph-breaks there, so no graph pattern can see it; ``prepare(model)`` is the
route for it. Replacements are traced with ``fwd_only`` under the graph's fake mode and spliced in.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from omniops.graph_passes.hf import moe_op
from omniops.graph_passes.report import PassReport

aten = torch.ops.aten


def why_not_fused() -> str:
    if moe_op("fused_moe") is None:
        return "omniops.fused_moe is not available (fused_moe not merged yet)"
    return "experts form not recognised (bias, transposed weights, other activation or expert parallelism)"


def _is(n: Any, *targets: Any) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in targets


def _strip(n: Any) -> Any:
    """Skip dtype casts and no-op reshapes that do not change what a value is."""
    while _is(n, torch.ops.prims.convert_element_type.default, aten._to_copy.default):
        n = n.args[0]
    return n


def _getitem(n: Any, i: int) -> Any:
    if _is(n, operator.getitem) and n.args[1] == i:
        return n.args[0]
    return None


def _splice(graph: torch.fx.Graph, anchor: torch.fx.Node, fn, args: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """Trace ``fn`` on the args' fake values and insert its graph before ``anchor``; returns its outputs."""
    from torch._inductor.pattern_matcher import fwd_only
    from torch._inductor.virtualized import V

    vals = [a.meta["val"] for a in args]
    fake_mode = torch._guards.detect_fake_mode(vals)
    with fake_mode if fake_mode is not None else V.fake_mode:
        gm = fwd_only(fn, vals)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for p, a in zip(placeholders, args, strict=True):
        env[p] = a
    outs: list[torch.fx.Node] = []
    with graph.inserting_before(anchor):
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                res = n.args[0]
                outs = [env[r] for r in (res if isinstance(res, (list, tuple)) else [res])]
                break
            env[n] = graph.node_copy(n, lambda x: env[x])
    return outs


# ---- router ----------------------------------------------------------------------------------------------------
def _softmax_input(p: Any) -> Any:
    """The logits of ``p = softmax(logits, -1)`` (decomposed or not), else None."""
    if _is(p, aten._softmax.default) and p.args[1] in (-1, len(p.meta["val"].shape) - 1):
        return p.args[0]
    if not _is(p, aten.div.Tensor):
        return None
    e, s = p.args
    if not (_is(e, aten.exp.default) and _is(s, aten.sum.dim_IntList) and s.args[0] is e):
        return None
    sub = e.args[0]
    if not (_is(sub, aten.sub.Tensor) and _is(sub.args[1], aten.amax.default) and sub.args[1].args[0] is sub.args[0]):
        return None
    return sub.args[0]


def _route_pass(graph: torch.fx.Graph, rep: PassReport) -> None:
    route = moe_op("moe_route")
    for node in list(graph.nodes):
        if not _is(node, aten.topk.default):
            continue
        args = list(node.args) + [None] * (5 - len(node.args))
        k, dim = args[1], args[2] if args[2] is not None else node.kwargs.get("dim", -1)
        largest = args[3] if args[3] is not None else node.kwargs.get("largest", True)
        logits = _softmax_input(node.args[0])
        if logits is None or not isinstance(k, int) or dim not in (-1, 1) or not largest:
            continue
        val = logits.meta.get("val")
        # A router: [T, E] fp32 scores over a modest number of experts (not, say, a top-k over a vocabulary).
        if val is None or val.dim() != 2 or val.dtype != torch.float32 or not _static_le(val.shape[1], 1024) \
                or k > 32:
            continue
        if route is None:
            rep.miss("moe_route", "omniops.moe_route is not available (fused_moe not merged yet)")
            return
        users = {_getitem_index(u): u for u in node.users}
        if set(users) - {0, 1}:
            continue
        values, ids = users.get(0), users.get(1)
        out_w, renorm = values, False
        if values is not None:
            # values / values.sum(-1, keepdim=True): the renormalisation (users: that sum and that div)
            divs = [d for d in values.users if _is(d, aten.div.Tensor) and d.args[0] is values
                    and _is(d.args[1], aten.sum.dim_IntList) and d.args[1].args[0] is values
                    and list(d.args[1].args[1]) in ([-1], [1]) and d.args[1].args[2:3] in ((True,), [True])]
            if len(divs) == 1 and set(values.users) == {divs[0], divs[0].args[1]}:
                out_w, renorm = divs[0], True

        w_new, ids_new = _splice(graph, node, _route_fn(route, k, renorm), [logits])
        if out_w is not None:
            out_w.replace_all_uses_with(w_new)
        if ids is not None:
            ids.replace_all_uses_with(ids_new)
        rep.add("moe_route")


def _static_le(n: Any, bound: int) -> bool:
    return isinstance(n, int) and n <= bound


def _route_fn(route, k: int, renorm: bool):
    def fn(logits):
        w, i = route(logits, k, scoring="softmax", renormalize=renorm)
        return w, i.to(torch.int64)
    return fn


def _getitem_index(n: torch.fx.Node) -> int:
    return n.args[1] if _is(n, operator.getitem) else -1


# ---- experts ---------------------------------------------------------------------------------------------------
def _gmm_args(n: torch.fx.Node) -> tuple[Any, Any, Any]:
    a = list(n.args)
    offs = a[2] if len(a) > 2 else n.kwargs.get("offs")
    return a[0], a[1], offs


def _weight_of(t: Any) -> Any:
    """``w`` for ``t = w.transpose(-2, -1)`` on a 3-D weight (HF's is_transposed=False layout), else None."""
    if _is(t, aten.permute.default) and list(t.args[1]) == [0, 2, 1]:
        return t.args[0]
    if _is(t, aten.transpose.int) and sorted(a % 3 for a in t.args[1:3]) == [1, 2]:
        return t.args[0]
    return None


def _is_silu_of(a: Any, g: Any) -> bool:
    if _is(a, aten.silu.default):
        return a.args[0] is g
    if _is(a, aten.div.Tensor) and a.args[0] is g:  # g / (1 + exp(-g)), Inductor's decomposition
        d = a.args[1]
        if _is(d, aten.add.Tensor) and d.args[1] == 1 and _is(d.args[0], aten.exp.default):
            neg = d.args[0].args[0]
            return _is(neg, aten.neg.default) and neg.args[0] is g
    if _is(a, aten.mul.Tensor):  # g * sigmoid(g)
        x, s = a.args
        return x is g and _is(s, aten.sigmoid.default) and s.args[0] is g
    return False


def _silu_mul_input(m: Any) -> Any:
    """``x`` for ``m = silu(x[..., :d]) * x[..., d:]`` (chunk -> split), else None."""
    m = _strip(m)
    if not _is(m, aten.mul.Tensor):
        return None
    a, up = m.args
    up = _strip(up)
    src = _getitem(up, 1)
    if src is None or not _is(src, aten.split.Tensor, aten.split_with_sizes.default):
        return None
    gates = [u for u in src.users if _getitem_index(u) == 0]
    if len(gates) != 1:
        return None
    gate = gates[0]
    a = _strip(a)
    if not (_is_silu_of(a, gate) or (_is(a, aten.silu.default) and _strip(a.args[0]) is gate)):
        return None
    return src.args[0]


def _experts_pass(graph: torch.fx.Graph, rep: PassReport) -> None:
    from omniops.graph_passes.backend import _grouped_mm_targets

    targets = _grouped_mm_targets()
    if not targets:
        return
    fused = moe_op("fused_moe")
    for g2 in list(graph.nodes):
        if not _is(g2, *targets) or g2._erased:
            continue
        x2, w2t, offs = _gmm_args(g2)
        h = _silu_mul_input(x2)
        g1 = _strip(h) if h is not None else None
        if g1 is None or not _is(g1, *targets) or _gmm_args(g1)[2] is not offs:
            continue
        x1, w13t, _ = _gmm_args(g1)
        w13, w2 = _weight_of(w13t), _weight_of(w2t)
        x1 = _strip(x1)
        # x1 = hidden[perm // k];  perm = sort(topk_ids.view(-1)).indices
        if w13 is None or w2 is None or not _is(x1, aten.index.Tensor) or len(x1.args[1]) != 1:
            continue
        hidden, sel = x1.args[0], x1.args[1][0]
        if not (_is(sel, aten.div.Tensor_mode) and sel.kwargs.get("rounding_mode") == "floor"):
            continue
        perm, k = sel.args
        srt = _getitem(perm, 1)
        if srt is None or not _is(srt, aten.sort.default) or not _is(srt.args[0], aten.view.default,
                                                                      aten.reshape.default):
            continue
        topk_ids = srt.args[0].args[0]
        # out = (g2 * w_sorted[:, None])[inv_perm].view(T, k, H).sum(1)
        if len(g2.users) != 1:
            continue
        (mul,) = g2.users
        if not _is(mul, aten.mul.Tensor) or len(mul.users) != 1:
            continue
        ws = mul.args[1] if mul.args[0] is g2 else mul.args[0]
        if _is(ws, aten.unsqueeze.default):
            ws = ws.args[0]
        if not (_is(ws, aten.index.Tensor) and ws.args[1][0] is perm and _is(ws.args[0], aten.view.default,
                                                                             aten.reshape.default)):
            continue
        topk_weights = ws.args[0].args[0]
        (unsort,) = mul.users
        if not _is(unsort, aten.index.Tensor) or len(unsort.users) != 1:
            continue
        (view,) = unsort.users
        if not _is(view, aten.view.default, aten.reshape.default) or len(view.users) != 1:
            continue
        (total,) = view.users
        if not (_is(total, aten.sum.dim_IntList) and list(total.args[1]) == [1]):
            continue
        hv, idv, wv = hidden.meta.get("val"), topk_ids.meta.get("val"), topk_weights.meta.get("val")
        if hv is None or idv is None or wv is None or hv.dim() != 2 or idv.dim() != 2 or idv.shape[1] != k:
            continue
        if fused is None:
            rep.miss("fused_moe", why_not_fused())
            return
        if w13.meta["val"].dtype != hv.dtype:
            continue

        def fn(hs, a, b, tw, ti):
            return fused(hs, a, b, tw, ti, activation="silu")

        (out,) = _splice(graph, total, fn, [hidden, w13, w2, topk_weights, topk_ids])
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
        if _is(ids, torch.ops.prims.convert_element_type.default) and ids.args[1] == torch.int64:
            src = ids.args[0]
            if isinstance(src, torch.fx.Node) and getattr(src.meta.get("val"), "dtype", None) == torch.int32:
                n.replace_input_with(ids, src)


def moe_pass(graph: torch.fx.Graph, rep: PassReport) -> None:
    """Router then experts (the experts matcher reads the router's outputs)."""
    _route_pass(graph, rep)
    _experts_pass(graph, rep)
    _ids_int32(graph)
    graph.eliminate_dead_code()
