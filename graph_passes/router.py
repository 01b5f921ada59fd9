"""Graph rewrites of HF MoE routers onto ``omni::moe_route`` (part of the ``moe`` pass, before the experts).

Hand-written FX matchers:

* ``topk(softmax(logits), k)`` [+ ``values / values.sum(-1, keepdim=True)``] (Qwen3-MoE, Mixtral)
  -> ``moe_route(logits, k, scoring="softmax", renormalize=...)``.
* DeepSeek-V3's grouped sigmoid router (``DeepseekV3TopkRouter``: sigmoid, correction bias for the choice, group
  scores = sum of the top-2, top ``topk_group`` groups, masked top-k, weights gathered from the unbiased scores
  [+ renormalise] [* scaling]; also n_group = 1) -> ``moe_route(logits, k, scoring="sigmoid", num_groups=...,
  topk_groups=..., correction_bias=..., renormalize=..., routed_scaling=...)``.

The ids come back as int64 (what HF's experts index with); the experts pass drops that cast again when it
feeds them to ``fused_moe``. Replacements are traced with ``fwd_only`` under the graph's fake mode and spliced in.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omniops.graph_passes.fx_utils import (
    getitem_index,
    getitem_source,
    is_call,
    meta_val,
    softmax_input,
    splice,
    strip_casts,
)
from omniops.graph_passes.report import PassReport

from omniops.ops.moe import moe_route

aten = torch.ops.aten


def route_pass(graph: torch.fx.Graph, rep: PassReport) -> None:
    """Both router forms, softmax first."""
    _softmax_route_pass(graph, rep)
    _sigmoid_route_pass(graph, rep)


# ---- softmax top-k --------------------------------------------------------------------------------------------
def _softmax_route_pass(graph: torch.fx.Graph, rep: PassReport) -> None:
    for node in list(graph.nodes):
        if not is_call(node, aten.topk.default):
            continue
        args = list(node.args) + [None] * (5 - len(node.args))
        k, dim = args[1], args[2] if args[2] is not None else node.kwargs.get("dim", -1)
        largest = args[3] if args[3] is not None else node.kwargs.get("largest", True)
        logits = softmax_input(node.args[0])
        if logits is None or not isinstance(k, int) or dim not in (-1, 1) or not largest:
            continue
        val = logits.meta.get("val")
        # A router: [T, E] fp32 scores over a modest number of experts (not, say, a top-k over a vocabulary).
        if val is None or val.dim() != 2 or val.dtype != torch.float32 or not _static_le(val.shape[1], 1024) \
                or k > 32:
            continue
        users = {getitem_index(u): u for u in node.users}
        if set(users) - {0, 1}:
            continue
        values, ids = users.get(0), users.get(1)
        out_w, renorm = values, False
        if values is not None:
            # values / values.sum(-1, keepdim=True): the renormalisation (users: that sum and that div)
            divs = [d for d in values.users if is_call(d, aten.div.Tensor) and d.args[0] is values
                    and is_call(d.args[1], aten.sum.dim_IntList) and d.args[1].args[0] is values
                    and list(d.args[1].args[1]) in ([-1], [1]) and d.args[1].args[2:3] in ((True,), [True])]
            if len(divs) == 1 and set(values.users) == {divs[0], divs[0].args[1]}:
                out_w, renorm = divs[0], True

        w_new, ids_new = splice(graph, node, _route_fn(k, renorm), [logits])
        if out_w is not None:
            out_w.replace_all_uses_with(w_new)
        if ids is not None:
            ids.replace_all_uses_with(ids_new)
        rep.add("moe_route")


def _static_le(n: Any, bound: int) -> bool:
    return isinstance(n, int) and n <= bound


def _route_fn(k: int, renorm: bool):
    def fn(logits):
        w, i = moe_route(logits, k, scoring="softmax", renormalize=renorm)
        return w, i.to(torch.int64)
    return fn


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
    if not is_call(n, aten.topk.default):
        return None
    a = list(n.args) + [None] * (5 - len(n.args))
    k = a[1] if a[1] is not None else n.kwargs.get("k")
    dim = a[2] if a[2] is not None else n.kwargs.get("dim", -1)
    largest = a[3] if a[3] is not None else n.kwargs.get("largest", True)
    if not isinstance(k, int) or not isinstance(dim, int):
        return None
    return a[0], k, dim, bool(largest)


def _shape(n: Any) -> tuple | None:
    v = meta_val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _const(n: Any) -> Any:
    """A Python number, or the value of a ``full([], v)`` / ``scalar_tensor(v)`` node; else None."""
    if isinstance(n, (int, float)) and not isinstance(n, bool):
        return n
    if is_call(n, aten.full.default) and list(n.args[0]) == []:
        return n.args[1]
    if is_call(n, aten.scalar_tensor.default):
        return n.args[0]
    return None


def _group_onehot(n: Any, G: int) -> Any:
    """``gidx`` for ``n`` = the [T, G] one-hot (any dtype) of the kept groups ``gidx [T, tg]``, else None."""
    n = strip_casts(n)
    if is_call(n, aten.scatter.value):
        base, dim, idx, val = n.args[:4]
        if dim in (1, -1) and is_call(base, aten.full.default) and base.args[1] == 0 and val != 0 \
                and (_shape(base) or (None, None))[1] == G:
            return idx
        return None
    # topk_group == 1: Inductor decomposes the scatter of a single index per row into a compare with iota
    if not (is_call(n, aten.where.self) and _const(n.args[1]) == 1 and _const(n.args[2]) == 0):
        return None
    eq = n.args[0]
    if not is_call(eq, aten.eq.Tensor):
        return None
    for a, b in (eq.args, eq.args[::-1]):
        if is_call(b, aten.view.default, aten.reshape.default):
            b = b.args[0]
        if is_call(b, torch.ops.prims.iota.default) and b.args[0] == G and b.kwargs.get("start", 0) == 0 \
                and b.kwargs.get("step", 1) == 1:
            if is_call(a, aten.expand.default):
                a = a.args[0]
            if (_shape(a) or (None, None))[1:] == (1,):
                return a
    return None


def _group_mask_ids(cond: Any, E: int) -> tuple[Any, int]:
    """``(gidx, G)`` for ``cond`` = the [T, E] bool "expert is in a kept group" mask built from the kept group
    ids ``gidx`` of G groups, else ``(None, 0)``."""
    n = cond
    if not (is_call(n, torch.ops.prims.convert_element_type.default, aten._to_copy.default)
            and n.meta["val"].dtype == torch.bool):
        return None, 0
    n = n.args[0]
    if not (is_call(n, aten.view.default, aten.reshape.default) and (_shape(n) or ())[1:] == (E,)):
        return None, 0
    n = n.args[0]
    if is_call(n, aten.clone.default):
        n = n.args[0]
    s = _shape(n) if is_call(n, aten.expand.default) else None
    if s is None or len(s) != 3 or not isinstance(s[1], int) or s[1] < 1 or s[1] * s[2] != E:
        return None, 0
    G = s[1]
    n = n.args[0]
    if not (is_call(n, aten.unsqueeze.default) and n.args[1] in (-1, 2)):
        return None, 0
    gidx = _group_onehot(n.args[0], G)
    return (gidx, G) if gidx is not None else (None, 0)


def _sigmoid_route_pass(graph: torch.fx.Graph, rep: PassReport) -> None:
    for node in list(graph.nodes):
        ta = _topk_args(node)
        if ta is None or node._erased:
            continue
        masked, k, dim, largest = ta
        # final top-k over where(~mask, -inf, s + bias): only its ids are used
        if not largest or dim not in (-1, 1) or not is_call(masked, aten.where.self):
            continue
        users = {getitem_index(u): u for u in node.users}
        if set(users) != {1} or len(node.users) != 1:
            continue
        ids = users[1]
        cond, a, b = masked.args
        if _const(a) == float("-inf") and is_call(cond, aten.bitwise_not.default):
            cond, choice = cond.args[0], b
        elif _const(b) == float("-inf"):
            choice = a
        else:
            continue
        if not is_call(choice, aten.add.Tensor):
            continue
        sig, bias = choice.args
        if not is_call(sig, aten.sigmoid.default):
            sig, bias = bias, sig
        if not is_call(sig, aten.sigmoid.default) or not isinstance(bias, torch.fx.Node):
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
        gtop = getitem_source(gidx, 1)
        gta = _topk_args(gtop)
        if gta is None or not gta[3] or gta[2] not in (-1, 1):
            continue
        gsum, tg = gta[0], gta[1]
        if not (is_call(gsum, aten.sum.dim_IntList) and list(gsum.args[1]) in ([-1], [2])
                and not (gsum.args[2:3] and gsum.args[2])):
            continue
        top2 = _topk_args(getitem_source(gsum.args[0], 0))
        if top2 is None or top2[1:] not in ((2, -1, True), (2, 2, True)):
            continue
        view = top2[0]
        if not (is_call(view, aten.view.default, aten.reshape.default) and view.args[0] is choice
                and _shape(view)[1:] == (G, E // G)):
            continue
        if not (1 <= tg <= G and 1 <= k <= tg * (E // G) and E <= 16384 and k <= 32):
            continue
        # weights: the unbiased scores at the ids (weights from the biased scores are another router)
        gathers = [u for u in ids.users if is_call(u, aten.gather.default)]
        if len(gathers) != 1:
            continue
        gat = gathers[0]
        if gat.args[0] is not sig or gat.args[1] not in (1, -1) or gat.args[2] is not ids:
            continue
        out_w, renorm, scaling = gat, False, 1.0
        divs = [d for d in gat.users if is_call(d, aten.div.Tensor) and d.args[0] is gat]
        if len(divs) == 1 and len(gat.users) == 2:
            div = divs[0]
            den = div.args[1]
            eps = 0.0
            if is_call(den, aten.add.Tensor) and isinstance(_const(den.args[1]), float) and len(den.users) == 1:
                eps, den = den.args[1], den.args[0]
            if is_call(den, aten.sum.dim_IntList) and den.args[0] is gat and list(den.args[1]) in ([-1], [1]) \
                    and den.args[2:3] in ((True,), [True]) and len(den.users) == 1 and 0 <= eps <= _RENORM_EPS_MAX:
                out_w, renorm = div, True
        if len(out_w.users) == 1:
            (mul,) = out_w.users
            if is_call(mul, aten.mul.Tensor):
                c = mul.args[1] if mul.args[0] is out_w else mul.args[0]
                if isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c):
                    out_w, scaling = mul, float(c)
        w_new, ids_new = splice(graph, node, _sigmoid_route_fn(k, renorm, G, tg, scaling), [logits, bias])
        out_w.replace_all_uses_with(w_new)
        ids.replace_all_uses_with(ids_new)
        rep.add("moe_route")


def _sigmoid_route_fn(k: int, renorm: bool, groups: int, topk_groups: int, scaling: float):
    def fn(logits, bias):
        w, i = moe_route(logits, k, scoring="sigmoid", renormalize=renorm, num_groups=groups if groups > 1 else None,
                     topk_groups=topk_groups if groups > 1 else None, correction_bias=bias, routed_scaling=scaling)
        return w, i.to(torch.int64)
    return fn


