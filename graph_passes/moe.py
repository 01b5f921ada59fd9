"""Graph rewrites of HF MoE blocks onto ``omni::moe_route`` and ``omni::fused_moe``.

Hand-written FX matchers (the experts form has ~25 nodes with data-dependent shapes and two outputs of a
sort, which register_replacement's fixed-shape tracing cannot express):

* router: ``topk(softmax(logits), k)`` [+ ``values / values.sum(-1, keepdim=True)``] (Qwen3-MoE, Mixtral)
  -> ``moe_route(logits, k, scoring="softmax", renormalize=...)``.
* router: DeepSeek-V3's grouped sigmoid router (``DeepseekV3TopkRouter``: sigmoid, correction bias for the
  choice, group scores = sum of the top-2, top ``topk_group`` groups, masked top-k, weights gathered from the
  unbiased scores [+ renormalise] [* scaling]; also n_group = 1) -> ``moe_route(logits, k, scoring="sigmoid",
  num_groups=..., topk_groups=..., correction_bias=..., renormalize=..., routed_scaling=...)``.
* experts: transformers' ``grouped_mm_experts_forward`` as it reaches the post-grad graph (sort by expert,
  gather, grouped_mm(gate_up) -> silu(gate) * up -> grouped_mm(down), weight, unsort, sum over k), with
  ``torch.ops.transformers.grouped_mm_fallback`` (fp32/fp16 under compile) or ``aten._grouped_mm`` (bf16)
  -> ``fused_moe(hidden, gate_up_proj, down_proj, topk_weights, topk_ids)``.

HF's eager experts loop (``experts_implementation="eager"``) is a Python loop over the hit experts with
data-dependent shapes: Dynamo graph-breaks there, so no graph pattern can see it; ``prepare(model)`` is the
route for it. Replacements are traced with ``fwd_only`` under the graph's fake mode and spliced in.
"""

from __future__ import annotations

import math
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


def _val(n: Any) -> Any:
    """The fake value (meta["val"]) of an FX node, else None."""
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _hint(d: Any) -> int | None:
    """A size as an int: itself, or a symbolic size's compile-time hint (None when it has none)."""
    if isinstance(d, int):
        return d
    return d.node.hint if isinstance(d, torch.SymInt) else None


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


# ---- DeepSeek-V3's grouped sigmoid router -------------------------------------------------------------------
# transformers' DeepseekV3TopkRouter as it reaches the post-grad graph:
#   s = sigmoid(logits); c = s + bias
#   gs = topk(c.view(T, G, E // G), 2)[0].sum(-1); gidx = topk(gs, topk_group)[1]
#   onehot = scatter(zeros(T, G), 1, gidx, 1)            (topk_group == 1: where(gidx == iota(G), 1, 0))
#   m = onehot.unsqueeze(-1).expand(T, G, E // G).reshape(T, E).bool()
#   ids = topk(where(~m, -inf, c), k)[1]; w = s.gather(1, ids) [/ (w.sum(-1, keepdim) + eps)] [* scaling]
# -> moe_route(logits, k, scoring="sigmoid", renormalize, num_groups=G, topk_groups, correction_bias=bias,
# routed_scaling). HF's renormalisation adds 1e-20 to the sum, moe_route does not: they differ only when every
# chosen score underflows to 0 (logits below about -88), where HF gives 0 and moe_route 0/0.
_RENORM_EPS_MAX = 1e-12  # a larger epsilon would change the weights visibly: not HF's form, leave it alone


def _topk_args(n: Any) -> tuple[Any, int, int, bool] | None:
    """(input, k, dim, largest) of an aten.topk node, else None."""
    if not _is(n, aten.topk.default):
        return None
    a = list(n.args) + [None] * (5 - len(n.args))
    k = a[1] if a[1] is not None else n.kwargs.get("k")
    dim = a[2] if a[2] is not None else n.kwargs.get("dim", -1)
    largest = a[3] if a[3] is not None else n.kwargs.get("largest", True)
    if not isinstance(k, int) or not isinstance(dim, int):
        return None
    return a[0], k, dim, bool(largest)


def _shape(n: Any) -> tuple | None:
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _const(n: Any) -> Any:
    """A Python number, or the value of a ``full([], v)`` / ``scalar_tensor(v)`` node; else None."""
    if isinstance(n, (int, float)) and not isinstance(n, bool):
        return n
    if _is(n, aten.full.default) and list(n.args[0]) == []:
        return n.args[1]
    if _is(n, aten.scalar_tensor.default):
        return n.args[0]
    return None


def _group_onehot(n: Any, G: int) -> Any:
    """``gidx`` for ``n`` = the [T, G] one-hot (any dtype) of the kept groups ``gidx [T, tg]``, else None."""
    n = _strip(n)
    if _is(n, aten.scatter.value):
        base, dim, idx, val = n.args[:4]
        if dim in (1, -1) and _is(base, aten.full.default) and base.args[1] == 0 and val != 0 \
                and (_shape(base) or (None, None))[1] == G:
            return idx
        return None
    # topk_group == 1: Inductor decomposes the scatter of a single index per row into a compare with iota
    if not (_is(n, aten.where.self) and _const(n.args[1]) == 1 and _const(n.args[2]) == 0):
        return None
    eq = n.args[0]
    if not _is(eq, aten.eq.Tensor):
        return None
    for a, b in (eq.args, eq.args[::-1]):
        if _is(b, aten.view.default, aten.reshape.default):
            b = b.args[0]
        if _is(b, torch.ops.prims.iota.default) and b.args[0] == G and b.kwargs.get("start", 0) == 0 \
                and b.kwargs.get("step", 1) == 1:
            if _is(a, aten.expand.default):
                a = a.args[0]
            if (_shape(a) or (None, None))[1:] == (1,):
                return a
    return None


def _group_mask_ids(cond: Any, E: int) -> tuple[Any, int]:
    """``(gidx, G)`` for ``cond`` = the [T, E] bool "expert is in a kept group" mask built from the kept group
    ids ``gidx`` of G groups, else ``(None, 0)``."""
    n = cond
    if not (_is(n, torch.ops.prims.convert_element_type.default, aten._to_copy.default)
            and n.meta["val"].dtype == torch.bool):
        return None, 0
    n = n.args[0]
    if not (_is(n, aten.view.default, aten.reshape.default) and (_shape(n) or ())[1:] == (E,)):
        return None, 0
    n = n.args[0]
    if _is(n, aten.clone.default):
        n = n.args[0]
    s = _shape(n) if _is(n, aten.expand.default) else None
    if s is None or len(s) != 3 or not isinstance(s[1], int) or s[1] < 1 or s[1] * s[2] != E:
        return None, 0
    G = s[1]
    n = n.args[0]
    if not (_is(n, aten.unsqueeze.default) and n.args[1] in (-1, 2)):
        return None, 0
    gidx = _group_onehot(n.args[0], G)
    return (gidx, G) if gidx is not None else (None, 0)


def _sigmoid_route_pass(graph: torch.fx.Graph, rep: PassReport) -> None:
    route = moe_op("moe_route")
    for node in list(graph.nodes):
        ta = _topk_args(node)
        if ta is None or node._erased:
            continue
        masked, k, dim, largest = ta
        # final top-k over where(~mask, -inf, s + bias): only its ids are used
        if not largest or dim not in (-1, 1) or not _is(masked, aten.where.self):
            continue
        users = {_getitem_index(u): u for u in node.users}
        if set(users) != {1} or len(node.users) != 1:
            continue
        ids = users[1]
        cond, a, b = masked.args
        if _const(a) == float("-inf") and _is(cond, aten.bitwise_not.default):
            cond, choice = cond.args[0], b
        elif _const(b) == float("-inf"):
            choice = a
        else:
            continue
        if not _is(choice, aten.add.Tensor):
            continue
        sig, bias = choice.args
        if not _is(sig, aten.sigmoid.default):
            sig, bias = bias, sig
        if not _is(sig, aten.sigmoid.default) or not isinstance(bias, torch.fx.Node):
            continue
        logits = sig.args[0]
        lv, bv = logits.meta.get("val"), bias.meta.get("val")
        if not isinstance(lv, torch.Tensor) or not isinstance(bv, torch.Tensor) or lv.dim() != 2 \
                or lv.dtype != torch.float32 or not isinstance(lv.shape[1], int) \
                or bv.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
                or tuple(bv.shape) != (lv.shape[1],) or bv.device != lv.device:
            continue
        E = lv.shape[1]
        # the kept groups: topk(topk(c.view(T, G, E // G), 2)[0].sum(-1), topk_group)[1]
        gidx, G = _group_mask_ids(cond, E)
        if gidx is None:
            continue
        gtop = _getitem(gidx, 1)
        gta = _topk_args(gtop)
        if gta is None or not gta[3] or gta[2] not in (-1, 1):
            continue
        gsum, tg = gta[0], gta[1]
        if not (_is(gsum, aten.sum.dim_IntList) and list(gsum.args[1]) in ([-1], [2])
                and not (gsum.args[2:3] and gsum.args[2])):
            continue
        top2 = _topk_args(_getitem(gsum.args[0], 0))
        if top2 is None or top2[1:] not in ((2, -1, True), (2, 2, True)):
            continue
        view = top2[0]
        if not (_is(view, aten.view.default, aten.reshape.default) and view.args[0] is choice
                and _shape(view)[1:] == (G, E // G)):
            continue
        if not (1 <= tg <= G and 1 <= k <= tg * (E // G) and E <= 16384 and k <= 32):
            continue
        # weights: the unbiased scores at the ids (weights from the biased scores are another router)
        gathers = [u for u in ids.users if _is(u, aten.gather.default)]
        if len(gathers) != 1:
            continue
        gat = gathers[0]
        if gat.args[0] is not sig or gat.args[1] not in (1, -1) or gat.args[2] is not ids:
            continue
        out_w, renorm, scaling = gat, False, 1.0
        divs = [d for d in gat.users if _is(d, aten.div.Tensor) and d.args[0] is gat]
        if len(divs) == 1 and len(gat.users) == 2:
            div = divs[0]
            den = div.args[1]
            eps = 0.0
            if _is(den, aten.add.Tensor) and isinstance(_const(den.args[1]), float) and len(den.users) == 1:
                eps, den = den.args[1], den.args[0]
            if _is(den, aten.sum.dim_IntList) and den.args[0] is gat and list(den.args[1]) in ([-1], [1]) \
                    and den.args[2:3] in ((True,), [True]) and len(den.users) == 1 and 0 <= eps <= _RENORM_EPS_MAX:
                out_w, renorm = div, True
        if len(out_w.users) == 1:
            (mul,) = out_w.users
            if _is(mul, aten.mul.Tensor):
                c = mul.args[1] if mul.args[0] is out_w else mul.args[0]
                if isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c):
                    out_w, scaling = mul, float(c)
        if route is None:
            rep.miss("moe_route", "omniops.moe_route is not available (fused_moe not merged yet)")
            return
        w_new, ids_new = _splice(graph, node, _sigmoid_route_fn(route, k, renorm, G, tg, scaling), [logits, bias])
        out_w.replace_all_uses_with(w_new)
        ids.replace_all_uses_with(ids_new)
        rep.add("moe_route")


def _sigmoid_route_fn(route, k: int, renorm: bool, groups: int, topk_groups: int, scaling: float):
    def fn(logits, bias):
        w, i = route(logits, k, scoring="sigmoid", renormalize=renorm, num_groups=groups if groups > 1 else None,
                     topk_groups=topk_groups if groups > 1 else None, correction_bias=bias, routed_scaling=scaling)
        return w, i.to(torch.int64)
    return fn


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
    """``a = silu(g)``: aten.silu, Inductor's ``g / (1 + exp(-g))`` or ``g * sigmoid(g)``; dtype casts of g allowed
    (half-precision experts compute it in fp32: ``convert(g, f32) / (1 + exp(-convert(g, f32)))``)."""
    def same(x: Any) -> bool:
        return _strip(x) is g

    if _is(a, aten.silu.default):
        return same(a.args[0])
    if _is(a, aten.div.Tensor) and same(a.args[0]):
        d = a.args[1]
        if _is(d, aten.add.Tensor) and d.args[1] == 1 and _is(d.args[0], aten.exp.default):
            neg = d.args[0].args[0]
            return _is(neg, aten.neg.default) and same(neg.args[0])
    if _is(a, aten.mul.Tensor):  # g * sigmoid(g)
        x, s = a.args
        return same(x) and _is(s, aten.sigmoid.default) and same(s.args[0])
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
    """Routers then experts (the experts matcher reads the routers' outputs)."""
    _route_pass(graph, rep)
    _sigmoid_route_pass(graph, rep)
    _experts_pass(graph, rep)
    _ids_int32(graph)
    graph.eliminate_dead_code()
