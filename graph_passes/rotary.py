"""Graph rewrite of HF's rotary embedding (``apply_rotary_pos_emb`` with ``rotate_half``) onto
``omni::rotary_embedding``.

HF (Llama, Qwen3, Mixtral, Qwen3-MoE) computes, per layer::

    q = q_proj(x).view(B, S, H, D).transpose(1, 2)            # Qwen3: q_norm(...) before the transpose
    q_embed = q * cos[:, None] + cat((-q[..., D/2:], q[..., :D/2]), -1) * sin[:, None]     # k likewise

with ``cos, sin [B or 1, S, D] = cat((freqs, freqs), -1).cos() / .sin()`` (times a scale, cast to q's dtype)
from the rotary module. In the post-grad graph that is ``add(mul(X, C), mul(cat([neg(slice(X)), slice(X)]),
S))`` with ``X = permute(Y, [0, 2, 1, 3])``. ``Y [B, S, H, D]`` is token-major, vLLM's ``[T, H, D]`` layout,
so the op takes it as it is (no copy); its output is viewed back with the same permute (the strides the
replaced node had). The cos/sin cache rows are ``cat(cos[..., :D/2], sin[..., :D/2])`` of HF's per-token
tensors, positions ``arange`` over the tokens (or over S when cos is broadcast over the batch), so the op
needs no gather. That drops the second half of cos/sin, so the pass checks that the halves are equal by
construction: cos/sin must be elementwise functions (cos/sin, scale, cast) of ``cat([f, f], -1)`` (or its
Inductor form ``expand(unsqueeze(f, -2), [..., 2, D/2]).reshape(..., D)``); anything else is left alone.

q and k of one layer share cos/sin and go into one call (as vLLM's op); a rotate_half without a partner
that uses the same cos/sin (e.g. k rotated by other angles) is not rewritten.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from omniops.graph_passes.config import PassConfig
from omniops.graph_passes.fx_utils import broadcast_copy, is_call, meta_val, size_hint, splice
from omniops.graph_passes.patterns import DTYPES
from omniops.graph_passes.report import PassReport

aten = torch.ops.aten
prims = torch.ops.prims

_ELEMENTWISE = (aten.cos.default, aten.sin.default, prims.convert_element_type.default)


def _dim_is(d: Any, ndim: int, want: int) -> bool:
    return isinstance(d, int) and (d == want or d == want - ndim)


def _slice(n: Any) -> tuple[Any, Any, Any] | None:
    """``x[..., start:end]`` on the last dim of a 4-D x -> (x, start, end)."""
    if not is_call(n, aten.slice.Tensor):
        return None
    args = list(n.args) + [None] * (5 - len(n.args))
    x, dim, start, end, step = args[:5]
    if not _dim_is(dim, 4, 3) or step not in (None, 1):
        return None
    return x, 0 if start is None else start, sys.maxsize if end is None else end


def _rotate_half_input(cat: Any, half: Any) -> Any:
    """``x`` of ``cat([-x[..., half:], x[..., :half]], -1)`` (HF's rotate_half), else None."""
    if not is_call(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return None
    if not _dim_is(cat.args[1] if len(cat.args) > 1 else 0, 4, 3):
        return None
    neg, lo = cat.args[0]
    if not is_call(neg, aten.neg.default):
        return None
    a, b = _slice(neg.args[0]), _slice(lo)
    if a is None or b is None or a[0] is not b[0]:
        return None
    d = meta_val(a[0]).shape[-1]
    # hi half: [half, end >= D); lo half: [0, half)
    if not (a[1] == half and b[1] == 0 and b[2] == half and (a[2] == sys.maxsize or a[2] == d)):
        return None
    return a[0]


def _scalar(a: Any) -> bool:
    """A Python number or a 0-dim tensor (dynamic=True makes HF's attention_scaling a graph input)."""
    if not isinstance(a, torch.fx.Node):
        return isinstance(a, (int, float))
    v = meta_val(a)
    return v is not None and v.dim() == 0


def _halves_equal_source(n: Any) -> bool:
    """True when ``n [..., D]`` is elementwise (cos, sin, cast, times a scalar) of ``cat([f, f], -1)``, so
    its two halves are equal by construction."""
    while True:
        if is_call(n, *_ELEMENTWISE):
            n = n.args[0]
        elif is_call(n, aten.mul.Tensor, aten.div.Tensor) and _scalar(n.args[1]):
            n = n.args[0]
        elif is_call(n, aten._to_copy.default) and set(n.kwargs) <= {"dtype"}:
            n = n.args[0]
        else:
            break
    v = meta_val(n)
    if v is None or v.dim() < 1:
        return False
    if is_call(n, aten.cat.default):
        parts = n.args[0]
        return (len(parts) == 2 and parts[0] is parts[1] and _dim_is(n.args[1] if len(n.args) > 1 else 0,
                                                                      v.dim(), v.dim() - 1))
    # Inductor's form of cat([f, f], -1): expand(unsqueeze(f, -2), [..., 2, D/2]) (+ clone), reshape [..., D]
    copy = broadcast_copy(n, (aten.reshape.default, aten.view.default))
    if copy is None:
        return False
    u, e = copy
    uv, ev = meta_val(u), meta_val(e)
    if uv is None or ev is None:
        return False
    f = meta_val(u.args[0])
    nd = f.dim() if f is not None else -1
    return (nd >= 1 and _dim_is(u.args[1], nd + 1, nd - 1) and ev.dim() == nd + 1 and ev.shape[-2] == 2
            and ev.shape[-1] == f.shape[-1] and tuple(v.shape) == (*f.shape[:-1], 2 * f.shape[-1]))


def _unsqueezed_1(n: Any) -> Any:
    """``t`` of ``t.unsqueeze(1)`` with t [B, S, D], else None."""
    if is_call(n, aten.unsqueeze.default) and _dim_is(n.args[1], 4, 1):
        t = n.args[0]
        v = meta_val(t)
        if v is not None and v.dim() == 3:
            return t
    return None


def _parse(add: torch.fx.Node) -> tuple[Any, Any, Any] | None:
    """``add`` = x * C + rotate_half(x) * S (any operand order) with x = Y.permute(0, 2, 1, 3), C / S =
    cos / sin [B|1, S, D] unsqueezed at 1 -> (Y, cos, sin), else None."""
    if not is_call(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    for m1, m2 in (add.args, add.args[::-1]):
        if not (is_call(m1, aten.mul.Tensor) and is_call(m2, aten.mul.Tensor)):
            continue
        for x, c in (m1.args, m1.args[::-1]):
            xv = meta_val(x)
            if not is_call(x, aten.permute.default) or list(x.args[1]) not in ([0, 2, 1, 3], [0, 2, 1, -1]):
                continue
            if xv is None or xv.dim() != 4 or not isinstance(xv.shape[-1], int) or xv.shape[-1] % 2:
                continue
            for r, s in (m2.args, m2.args[::-1]):
                if _rotate_half_input(r, xv.shape[-1] // 2) is x:
                    cos, sin = _unsqueezed_1(c), _unsqueezed_1(s)
                    if cos is not None and sin is not None:
                        return x.args[0], cos, sin
    return None


def _static_one(d: Any) -> bool:
    return isinstance(d, int) and d == 1


def _tokens_ok(y: torch.Tensor, min_rows: int) -> bool:
    """The min_rows guard (patterns.rows_ok) on tokens = B * S (not B * S * H rows of the 4-D view)."""
    if min_rows <= 0 or y.device.type != "cpu":
        return True
    b, s = size_hint(y.shape[0]), size_hint(y.shape[1])
    return b is None or s is None or b * s >= min_rows


def _compatible(y: Any, cos: Any, sin: Any, add: torch.fx.Node, min_rows: int) -> str | None:
    """Why the op cannot take this match (None: it can)."""
    yv, cv, sv, av = meta_val(y), meta_val(cos), meta_val(sin), meta_val(add)
    if yv is None or cv is None or sv is None or av is None:
        return "no shape metadata"
    b, s, _h, d = yv.shape
    if av.dtype != yv.dtype or yv.dtype not in DTYPES:
        return "dtype promotion (cos/sin dtype differs from q/k)"
    if cv.dtype not in DTYPES or sv.dtype != cv.dtype or tuple(cv.shape) != tuple(sv.shape):
        return "cos and sin differ in dtype or shape"
    if cv.shape[-1] != d or cv.shape[1] != s or not (_static_one(cv.shape[0]) or cv.shape[0] == b):
        return "cos/sin are not [B or 1, S, head_dim]"
    if yv.device != cv.device:
        return "devices differ"
    # The op views q/k as [tokens, heads, head_dim]: HF's q_proj(x).view(B, S, H, D) (or a norm of it) is
    # contiguous; any other layout would need a copy, which Inductor's fused loop does not.
    if not yv.is_contiguous():
        return "q/k before the transpose is not contiguous"
    if not (_halves_equal_source(cos) and _halves_equal_source(sin)):
        return "cos/sin are not built as cat((freqs, freqs), -1) (the op uses only the first half)"
    if not _tokens_ok(yv, min_rows):
        return f"fewer than min_rows={min_rows} tokens (CPU: Inductor's fused loop is cheaper)"
    return None


def _replacement(broadcast_batch: bool):
    def fn(yq, yk, cos, sin):
        b, s, _, d = yq.shape
        half = d // 2
        cache = torch.cat([cos[..., :half], sin[..., :half]], dim=-1).reshape(-1, d)
        if broadcast_batch:  # cos/sin [1, S, D]: one cache row per sequence position, shared by the batch
            pos = torch.arange(s, device=yq.device).expand(b, s).contiguous()
        else:
            pos = torch.arange(b * s, device=yq.device).view(b, s)
        qo, ko = torch.ops.omni.rotary_embedding.default(pos, yq, yk, cache, d, d, True)
        return qo.permute(0, 2, 1, 3), ko.permute(0, 2, 1, 3)

    return fn


_WHY_DEFAULT = "not HF's apply_rotary_pos_emb form (q * cos + rotate_half(q) * sin)"


def rotary_pass(graph: torch.fx.Graph, rep: PassReport, cfg: PassConfig) -> None:
    """Rewrite every q/k pair; then report the rotate_halfs left with the first reason a match was refused."""
    why_left: list[str] = []
    found: list[tuple[torch.fx.Node, Any, Any, Any]] = []
    for node in graph.nodes:
        m = _parse(node)
        if m is None:
            continue
        why = _compatible(*m, node, cfg.min_rows)
        if why is not None:
            why_left.append(why)
            continue
        found.append((node, *m))
    order = {n: i for i, n in enumerate(graph.nodes)}
    used: set[torch.fx.Node] = set()
    n_done = 0
    for i, (add_q, yq, cos, sin) in enumerate(found):
        if add_q in used:
            continue
        # its partner: the next match with the same cos/sin and token shape (HF: k after q)
        partner = None
        for add_k, yk, cos_k, sin_k in found[i + 1:]:
            if add_k in used or cos_k is not cos or sin_k is not sin:
                continue
            qv, kv = meta_val(yq), meta_val(yk)
            if qv.shape[:2] != kv.shape[:2] or qv.shape[3] != kv.shape[3] or qv.dtype != kv.dtype:
                continue
            # the call goes before the later add: the earlier one's users must all come after it
            if all(order[u] > order[add_k] for u in add_q.users):
                partner = (add_k, yk)
            break
        if partner is None:
            why_left.append("no q/k pair sharing cos/sin (rotate_half applied to one tensor only)")
            continue
        add_k, yk = partner
        broadcast = _static_one(meta_val(cos).shape[0])
        qn, kn = splice(graph, add_k, _replacement(broadcast), [yq, yk, cos, sin])
        add_q.replace_all_uses_with(qn)
        add_k.replace_all_uses_with(kn)
        used.update((add_q, add_k))
        n_done += 1
    if n_done:
        rep.add("rotary", n_done)
    graph.eliminate_dead_code()
    n_left = rotate_half_left(graph)
    if n_left:
        rep.miss("rotary", f"{n_left} x rotate_half left: {why_left[0] if why_left else _WHY_DEFAULT}")


def rotate_half_left(graph: torch.fx.Graph) -> int:
    """How many HF rotate_half (cat of a negated upper half and the lower half) are in ``graph``."""
    n = 0
    for node in graph.nodes:
        v = meta_val(node)
        if is_call(node, aten.cat.default) and v is not None and v.dim() == 4 and isinstance(v.shape[-1], int) \
                and _rotate_half_input(node, v.shape[-1] // 2) is not None:
            n += 1
    return n

