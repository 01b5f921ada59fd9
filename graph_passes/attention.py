"""Graph rewrites of attention onto ``omni::gqa_attention`` (contiguous K/V, SDPA layout).

Hand-written FX matchers on the post-grad graph (CPU tensors only: on CUDA torch's flash / cuDNN SDPA is what
the Triton kernels would have to beat, and they have not been measured there):

* SDPA: ``aten._scaled_dot_product_flash_attention_for_cpu`` (what ``F.scaled_dot_product_attention`` becomes on
  CPU, incl. its native GQA) and ``aten._scaled_dot_product_attention_math``. ``is_causal`` is top-left aligned
  in SDPA and bottom-right in gqa_attention: they agree when the query and key lengths are provably equal (HF's
  prefill); otherwise the call is left alone. Masks (bool or additive) are passed through.
* eager attention (HF ``eager_attention_forward``): ``softmax(q @ k^T * scale [+ mask]) @ v`` as matmul
  decomposes (expand + reshape to 3-D + bmm), with the fp32 softmax casts of half-precision models.

Both strip HF's ``repeat_kv`` (``expand(k[:, :, None]).reshape``) so the kernel reads the Hk kv heads once
instead of a materialised Hq-head copy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omniops.graph_passes.config import PassConfig
from omniops.graph_passes.fx_utils import (
    broadcast_copy,
    getitem_index,
    is_call,
    meta_val,
    softmax_input,
    splice,
    strip_casts,
)
from omniops.graph_passes.report import PassReport
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
_VIEWS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _same(a: Any, b: Any) -> bool:
    return statically_known_true(a == b)


def _same_shape(x: Any, y: Any) -> bool:
    return x.dim() == y.dim() and all(_same(a, b) for a, b in zip(x.shape, y.shape, strict=True))


def _identity_copy(n: Any) -> Any:
    """Skip expand / clone nodes that keep the shape (matmul's broadcast of an operand that is already full)."""
    while is_call(n, aten.expand.default, aten.clone.default) and _same_shape(meta_val(n), meta_val(n.args[0])):
        n = n.args[0]
    return n


def _unflatten_batch(n: Any) -> Any:
    """``x`` 4-D for ``n = reshape(x, [x0 * x1, x2, x3])`` (matmul's bmm operand), else None."""
    if not is_call(n, *_VIEWS):
        return None
    x = _identity_copy(n.args[0])
    xv, nv = meta_val(x), meta_val(n)
    if xv is None or nv is None or xv.dim() != 4 or nv.dim() != 3:
        return None
    if not (_same(nv.shape[0], xv.shape[0] * xv.shape[1]) and _same(nv.shape[1], xv.shape[2])
            and _same(nv.shape[2], xv.shape[3])):
        return None
    return x


def _repeat_kv_base(n: Any) -> Any:
    """``k`` [B, Hk, L, D] for HF's ``repeat_kv(k, r) = k[:, :, None].expand(B, Hk, r, L, D).reshape(B, Hk*r, L, D)``
    (head h of the result is kv head h // r, gqa_attention's grouping), else ``n`` itself."""
    copy = broadcast_copy(n, _VIEWS)
    if copy is None or copy[0].args[1] != 2:
        return n
    u, e = copy
    k, kv, nv = u.args[0], meta_val(u.args[0]), meta_val(n)
    if kv is None or nv is None or kv.dim() != 4 or nv.dim() != 4:
        return n
    ev = meta_val(e)
    if not (_same(nv.shape[1], ev.shape[1] * ev.shape[2]) and _same(nv.shape[2], kv.shape[2])
            and _same(nv.shape[3], kv.shape[3]) and _same(nv.shape[0], kv.shape[0])):
        return n
    return k


def _usable(q: Any, k: Any, v: Any, mask: Any) -> str | None:
    """None when gqa_attention can compute this call, else why not."""
    qv, kv, vv = meta_val(q), meta_val(k), meta_val(v)
    if qv is None or kv is None or vv is None or qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        return "inputs are not 4-D [B, H, S, D]"
    if qv.device.type != "cpu":
        return "not a CPU graph (on GPU torch's SDPA stays)"
    if qv.dtype not in (torch.float32, torch.float16, torch.bfloat16) or kv.dtype != qv.dtype or vv.dtype != qv.dtype:
        return "q/k/v dtypes differ or are not float"
    hq, hk = qv.shape[1], kv.shape[1]
    if not (isinstance(hq, int) and isinstance(hk, int)) or hk == 0 or hq % hk:
        return "head counts are symbolic or not a GQA grouping"
    # k/v lengths may be distinct symbols (a cache's keys and values are marked dynamic one by one): SDPA and
    # gqa_attention both require them equal at run time, so only the head counts must match here.
    if not _same(kv.shape[1], vv.shape[1]):
        return "k and v head counts differ"
    if not statically_known_true(qv.shape[2] <= kv.shape[2]):
        return "query length not provably <= key length"
    if mask is not None:  # broadcastable to [B, H, S, L]: the matched SDPA / add required it already
        mv = meta_val(mask)
        if mv is None or mv.dim() > 4 or (mv.dtype != torch.bool and not mv.dtype.is_floating_point):
            return "mask is not a bool / float tensor of <= 4 dims"
    return None


def _attention_fn(causal: bool, scale: float, has_mask: bool):
    import omniops

    if has_mask:
        def fn(q, k, v, m):
            return omniops.gqa_attention(q, k, v, m, causal=causal, scale=scale)
    else:
        def fn(q, k, v):
            return omniops.gqa_attention(q, k, v, causal=causal, scale=scale)
    return fn


def _sdpa_targets() -> set[Any]:
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math")
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _sdpa_args(node: torch.fx.Node) -> dict[str, Any]:
    names = [a.name for a in node.target._schema.arguments]
    got = dict(zip(names, node.args, strict=False))
    got.update(node.kwargs)
    for a in node.target._schema.arguments:
        if a.name not in got:
            got[a.name] = a.default_value if a.has_default_value() else None
    return got


def _sdpa_pass(graph: torch.fx.Graph, rep: PassReport) -> None:
    targets = _sdpa_targets()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        a = _sdpa_args(node)
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        if a.get("dropout_p", 0.0) not in (0, 0.0) or a.get("dropout_mask") is not None:
            rep.miss("attention", "SDPA with dropout left alone")
            continue
        if any(getitem_index(u) != 0 for u in node.users):
            continue  # the logsumexp / attention weights are used (training graphs)
        k, v = _repeat_kv_base(k), _repeat_kv_base(v)
        why = _usable(q, k, v, mask)
        causal = bool(a.get("is_causal", False))
        if why is None and causal and not _same(meta_val(q).shape[2], meta_val(k).shape[2]):
            why = "is_causal with query length != key length (top-left vs bottom-right alignment)"
        if why is not None:
            rep.miss("attention", f"SDPA left to Inductor: {why}")
            continue
        if mask is not None and causal:
            continue  # SDPA rejects mask + is_causal anyway
        scale = a.get("scale")
        if scale is None:
            scale = 1.0 / math.sqrt(meta_val(q).shape[-1])
        args = [q, k, v] + ([mask] if mask is not None else [])
        (out,) = splice(graph, node, _attention_fn(causal, float(scale), mask is not None), args)
        for u in list(node.users):
            u.replace_all_uses_with(out)
        rep.add("attention")


# ---- eager softmax(q k^T * scale + mask) v -------------------------------------------------------------------
_MULS = (aten.mul.Tensor, aten.mul.Scalar)


def _times_const(x: Any) -> tuple[Any, float]:
    """(y, c) for ``x = y * c`` or ``y / c`` with c a Python number, else (x, 1.0)."""
    if is_call(x, *_MULS) and isinstance(x.args[1], (int, float)):
        return x.args[0], float(x.args[1])
    if is_call(x, *_MULS) and isinstance(x.args[0], (int, float)):
        return x.args[1], float(x.args[0])
    if is_call(x, aten.div.Tensor, aten.div.Scalar) and isinstance(x.args[1], (int, float)) and x.args[1] != 0:
        return x.args[0], 1.0 / float(x.args[1])
    return x, 1.0


def _qk(n: Any) -> tuple[Any, Any, float] | None:
    """(q, k, scale) for ``n = reshape(bmm(q3, kT3), [B, H, S, L]) [* c]`` with ``kT = k.transpose(-2, -1)``;
    constant factors on q, on kT or on the scores (SDPA's math path scales q and kT by sqrt(scale)) multiply."""
    n, scale = _times_const(strip_casts(n))
    if not is_call(n, *_VIEWS) or not is_call(n.args[0], aten.bmm.default):
        return None
    bmm = n.args[0]
    q, kt = _unflatten_batch(bmm.args[0]), _unflatten_batch(bmm.args[1])
    if q is None or kt is None:
        return None
    q, cq = _times_const(q)
    kt, ck = _times_const(kt)
    if is_call(kt, aten.permute.default) and list(kt.args[1]) == [0, 1, 3, 2]:
        k = kt.args[0]
    elif is_call(kt, aten.transpose.int) and sorted(d % 4 for d in kt.args[1:3]) == [2, 3]:
        k = kt.args[0]
    else:
        return None
    k, ck2 = _times_const(k)
    return q, k, scale * cq * ck * ck2


def _safe_softmax(p: Any) -> Any:
    """``s`` for SDPA math's ``where(row fully masked, 0, s)`` (gqa_attention gives those rows zeros too)."""
    if not (is_call(p, aten.where.self) and is_call(p.args[1], aten.full.default) and p.args[1].args[1] == 0):
        return p
    s = p.args[2]
    x = softmax_input(s)
    c = p.args[0]  # logical_not(any(logical_not(x == -inf), -1, keepdim))
    if x is None or not is_call(c, aten.logical_not.default) or not is_call(c.args[0], aten.any.dim):
        return p
    inner = c.args[0].args[0]
    if is_call(inner, aten.logical_not.default) and is_call(inner.args[0], aten.eq.Scalar) \
            and inner.args[0].args[0] is x and inner.args[0].args[1] == float("-inf"):
        return s
    return p


def _eager_pass(graph: torch.fx.Graph, rep: PassReport) -> None:
    for pv in list(graph.nodes):
        if not is_call(pv, aten.bmm.default) or len(pv.users) != 1:
            continue
        (out4,) = pv.users
        if not is_call(out4, *_VIEWS) or meta_val(out4) is None or meta_val(out4).dim() != 4:
            continue
        p4, v = _unflatten_batch(pv.args[0]), _unflatten_batch(pv.args[1])
        if p4 is None or v is None:
            continue
        x = softmax_input(_safe_softmax(strip_casts(p4)))
        if x is None:
            continue
        x = strip_casts(x)
        mask, qk = None, _qk(x)
        if qk is None and is_call(x, aten.add.Tensor):
            for s_arg, m_arg in ((x.args[0], x.args[1]), (x.args[1], x.args[0])):
                qk = _qk(s_arg)
                # the mask broadcasts to the scores: the sum has their shape
                if qk is not None and isinstance(m_arg, torch.fx.Node) and _same_shape(meta_val(x), meta_val(s_arg)):
                    mask = m_arg
                    break
                qk = None
        if qk is None:
            continue
        q, k, scale = qk
        k, v = _repeat_kv_base(k), _repeat_kv_base(v)
        why = _usable(q, k, v, mask)
        if why is None and mask is not None and not meta_val(mask).dtype.is_floating_point:
            why = "a non-float additive mask"
        if why is None and meta_val(q).dtype != meta_val(out4).dtype:
            why = "output dtype differs from q's"
        if why is not None:
            rep.miss("attention", f"eager attention left to Inductor: {why}")
            continue
        args = [q, k, v] + ([mask] if mask is not None else [])
        (new,) = splice(graph, out4, _attention_fn(False, scale, mask is not None), args)
        out4.replace_all_uses_with(new)
        rep.add("attention")


def attention_pass(graph: torch.fx.Graph, rep: PassReport, cfg: PassConfig) -> None:
    _sdpa_pass(graph, rep)
    _eager_pass(graph, rep)
    graph.eliminate_dead_code()

