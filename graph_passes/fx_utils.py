"""FX helpers shared by the hand-written matchers (moe, attention, linear, quant, rotary): node tests, the fake
values Inductor's post-grad graph carries in ``meta["val"]``, and splicing a traced replacement into the graph."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

aten = torch.ops.aten


def is_call(n: Any, *targets: Any) -> bool:
    """``n`` is an FX node calling one of ``targets``."""
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in targets


def meta_val(n: Any) -> Any:
    """The fake value (meta["val"]) of an FX node, else None."""
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def size_hint(d: Any) -> int | None:
    """A size as an int: itself, or a symbolic size's compile-time hint (None when it has none)."""
    if isinstance(d, int):
        return d
    return d.node.hint if isinstance(d, torch.SymInt) else None


def strip_casts(n: Any) -> Any:
    """Skip dtype casts, which do not change what a value is."""
    while is_call(n, torch.ops.prims.convert_element_type.default, aten._to_copy.default):
        n = n.args[0]
    return n


def getitem_source(n: Any, i: int) -> Any:
    """``x`` for ``n = x[i]`` (an output of a multi-output node), else None."""
    if is_call(n, operator.getitem) and n.args[1] == i:
        return n.args[0]
    return None


def getitem_index(n: torch.fx.Node) -> int:
    """``i`` for ``n = x[i]``, else -1."""
    return n.args[1] if is_call(n, operator.getitem) else -1


def broadcast_copy(n: Any, views: tuple[Any, ...]) -> tuple[Any, Any] | None:
    """``(unsqueeze node, expand node)`` for ``n = view(expand(unsqueeze(x, d)))`` (a clone between allowed): the
    copy-by-broadcast form HF's repeat_kv and Inductor's cat([f, f]) take in the graph; else None."""
    if not is_call(n, *views):
        return None
    e = n.args[0]
    if is_call(e, aten.clone.default):
        e = e.args[0]
    if not is_call(e, aten.expand.default) or not is_call(e.args[0], aten.unsqueeze.default):
        return None
    return e.args[0], e


def softmax_input(p: Any) -> Any:
    """The logits of ``p = softmax(logits, -1)`` (decomposed or not), else None."""
    if is_call(p, aten._softmax.default) and p.args[1] in (-1, len(p.meta["val"].shape) - 1):
        return p.args[0]
    if not is_call(p, aten.div.Tensor):
        return None
    e, s = p.args
    if not (is_call(e, aten.exp.default) and is_call(s, aten.sum.dim_IntList) and s.args[0] is e):
        return None
    sub = e.args[0]
    if not (is_call(sub, aten.sub.Tensor) and is_call(sub.args[1], aten.amax.default)
            and sub.args[1].args[0] is sub.args[0]):
        return None
    return sub.args[0]


def splice(graph: torch.fx.Graph, anchor: torch.fx.Node, fn: Callable[..., Any],
           args: list[torch.fx.Node]) -> list[torch.fx.Node]:
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
