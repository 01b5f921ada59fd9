"""Valid baseline calls of the public ops (``omniops.<op>``), the seeds the public fuzz suite mutates.

Outputs here are the arguments an op writes (in-place ops, ``out=``); returned tensors are compared too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from fuzz_specs_cpp import I64, Call, _f8, _i8, _ids, _ints, _paged, _t, _table, _u8
from fuzz_tensors import padded

_SCALARS_NONE = ("scale", "soft_cap", "window", "rotary_dim", "num_groups", "topk_groups", "block_size",
                 "out_dtype")


def _call(fn: str, args: dict, outputs=(), inplace=(), ranges=None, optional=(), reject=None) -> Call:
    return Call(fn, args, tuple(outputs), tuple(inplace), ranges or {}, tuple(optional) + _SCALARS_NONE + ("out",),
                reject or {}, public=True)


def rms_norm(mode: str) -> Call:
    a = {"x": _t((3, 20)), "weight": _t((20,)), "eps": 1e-6, "residual": _t((3, 20)) if mode == "residual" else None}
    if mode == "out":
        a["out"] = _t((3, 20), fill="zeros")
        return _call("rms_norm", a, ("out",), (("out", "x"),), optional=("residual",), reject={"eps": (-1.0,)})
    return _call("rms_norm", a, optional=("residual",), reject={"eps": (-1.0,)})


def rms_norm_() -> Call:
    a = {"x": _t((3, 20)), "weight": _t((20,)), "eps": 1e-5, "residual": _t((3, 20))}
    return _call("rms_norm_", a, ("x", "residual"), optional=("residual",), reject={"eps": (-1.0,)})


def silu_and_mul(out: bool) -> Call:
    a = {"x": _t((3, 24))}
    if out:
        a["out"] = _t((3, 12), fill="zeros")
    return _call("silu_and_mul", a, ("out",) if out else ())


def rotary(inplace: bool) -> Call:
    a = {"positions": _ints([0, 5, 2], I64), "q": _t((3, 32)), "k": _t((3, 16)), "cos_sin_cache": _t((7, 8)),
         "head_size": 16, "rotary_dim": 8, "is_neox": True}
    return _call("rotary_embedding_" if inplace else "rotary_embedding", a, ("q", "k") if inplace else (),
                 ranges={"positions": (0, 7)}, optional=("k",), reject={"head_size": (0, 7), "rotary_dim": (7, 18)})


def gqa_decode() -> Call:
    kc, vc = _paged()
    a = {"q": _t((2, 4, 16)), "k_cache": kc, "v_cache": vc, "block_table": _table([[3, 1, 0], [2, 5, 4]]),
         "seq_lens": _ints([9, 6]), "scale": 0.25, "soft_cap": 30.0, "window": 5, "validate": True}
    return _call("gqa_decode", a, ranges={"block_table": (0, 6), "seq_lens": (0, 13)},
                 reject={"soft_cap": (-1.0,), "window": (-1,)})


def mla_decode() -> Call:
    a = {"q": _t((2, 3, 40)), "kv_cache": _t((5, 4, 40)), "block_table": _table([[4, 0], [1, 3]]),
         "seq_lens": _ints([7, 3]), "scale": 0.2, "v_dim": 24, "validate": True}
    return _call("mla_decode", a, ranges={"block_table": (0, 5), "seq_lens": (0, 9)}, reject={"v_dim": (0, 41)})


def gqa_prefill() -> Call:
    kc, vc = _paged()
    a = {"q": _t((7, 4, 16)), "k": _t((7, 2, 16)), "v": _t((7, 2, 16)), "cu_seqlens": _ints([0, 3, 7]),
         "causal": True, "scale": 0.25, "k_cache": kc, "v_cache": vc, "block_table": _table([[1, 0], [5, 2]]),
         "context_lens": _ints([5, 2]), "validate": True}
    return _call("gqa_prefill", a, ranges={"block_table": (0, 6), "context_lens": (0, 9)},
                 optional=("k_cache", "v_cache", "block_table", "context_lens"))


def gqa_attention(q_len: int) -> Call:
    a = {"q": _t((2, 4, q_len, 16)), "k": _t((2, 2, 9, 16)), "v": _t((2, 2, 9, 12)),
         "attn_mask": _t((1, 4, q_len, 9)) if q_len > 1 else None, "causal": q_len > 1, "scale": 0.25}
    return _call("gqa_attention", a, optional=("attn_mask",))


def reshape_and_cache() -> Call:
    kc, vc = _paged()
    a = {"key": _t((5, 2, 16)), "value": _t((5, 2, 16)), "k_cache": kc, "v_cache": vc,
         "slot_mapping": _ints([0, 7, -1, 23, 12], I64), "validate": True}
    return _call("reshape_and_cache", a, ("k_cache", "v_cache"), ranges={"slot_mapping": (-1, 24)})


def mla_cache() -> Call:
    a = {"kv_c": _t((5, 32)), "k_pe": _t((5, 8)), "kv_cache": _t((6, 4, 40)),
         "slot_mapping": _ints([3, -1, 0, 23, 9], I64), "validate": True}
    return _call("mla_cache", a, ("kv_cache",), ranges={"slot_mapping": (-1, 24)})


def moe_route(grouped: bool) -> Call:
    a = {"router_logits": _t((5, 8)), "top_k": 2, "scoring": "sigmoid" if grouped else "softmax",
         "renormalize": True, "num_groups": 4 if grouped else None, "topk_groups": 2 if grouped else None,
         "correction_bias": _t((8,)) if grouped else None, "routed_scaling": 2.5}
    return _call("moe_route", a, optional=("correction_bias",), reject={"top_k": (0, 9), "scoring": ("bogus",)})


def moe_dispatch() -> Call:
    a = {"hidden": _t((3, 8)), "topk_ids": _ids([[0, 3], [1, 0], [3, 2]]), "num_experts": 4, "block_size": 4}
    return _call("moe_dispatch", a, ranges={"topk_ids": (0, 4)}, reject={"num_experts": (0,), "block_size": (0,)})


def grouped_gemm() -> Call:
    a = {"x_sorted": _t((7, 8)), "w": _t((3, 6, 8)), "expert_offsets": _ints([0, 2, 2, 6], I64)}
    return _call("grouped_gemm", a)


def moe_combine() -> Call:
    a = {"expert_out": _t((7, 8)), "topk_weights": _t((3, 2)), "inverse_index": _ids([[0, 6], [-1, 2], [3, 4]])}
    return _call("moe_combine", a, ranges={"inverse_index": (-1, 7)})


def fused_moe() -> Call:
    a = {"hidden": _t((3, 16)), "w13": _t((4, 10, 16)), "w2": _t((4, 16, 5)), "topk_weights": _t((3, 2)),
         "topk_ids": _ids([[0, 5], [1, 4], [5, 2]]), "activation": "silu", "expert_map": _ints([2, -1, 0, 1, 3, -1])}
    return _call("fused_moe", a, ranges={"topk_ids": (0, 6), "expert_map": (-1, 4)}, optional=("expert_map",),
                 reject={"activation": ("gelu",)})


def w8a8_gemm() -> Call:
    a = {"x_q": _i8((3, 40)), "x_scale": padded((3, 1), fill=0.02), "w_q": _i8((5, 40)),
         "w_scale": padded((5,), fill=0.03), "bias": _t((5,), torch.bfloat16)}
    return _call("w8a8_gemm", a, optional=("bias",))


def w4a16_gemm() -> Call:
    a = {"x": _t((3, 64)), "w_packed": _u8((5, 32)), "scales": padded((5, 2), fill=0.1), "zeros": _u8((5, 2), 16),
         "group_size": 32, "bias": _t((5,))}
    return _call("w4a16_gemm", a, optional=("zeros", "bias"), ranges={"zeros": (0, 16)},
                 reject={"group_size": (0, 48)})


def fp8_block_gemm() -> Call:
    a = {"x_q": _f8((3, 130)), "x_scale": padded((3, 2), fill=0.5), "w_q": _f8((5, 130)),
         "w_scale": padded((1, 2), fill=0.25), "bias": None}
    return _call("fp8_block_gemm", a, optional=("bias",))


def w8a8_linear() -> Call:
    a = {"x": _t((3, 40)), "w_q": _i8((5, 40)), "w_scale": padded((5,), fill=0.03), "bias": _t((5,))}
    return _call("w8a8_linear", a, optional=("bias",))


def fp8_block_linear() -> Call:
    a = {"x": _t((3, 130)), "w_q": _f8((5, 130)), "w_scale": padded((1, 2), fill=0.25), "bias": None}
    return _call("fp8_block_linear", a, optional=("bias",))


def quantize_int8() -> Call:
    return _call("quantize_activation_per_token_int8", {"x": _t((3, 40))})


BASELINES: dict[str, Callable[[], Call]] = {
    "rms_norm": lambda: rms_norm("plain"),
    "rms_norm+residual": lambda: rms_norm("residual"),
    "rms_norm+out": lambda: rms_norm("out"),
    "rms_norm_": rms_norm_,
    "silu_and_mul": lambda: silu_and_mul(False),
    "silu_and_mul+out": lambda: silu_and_mul(True),
    "rotary_embedding": lambda: rotary(False),
    "rotary_embedding_": lambda: rotary(True),
    "gqa_decode": gqa_decode,
    "mla_decode": mla_decode,
    "gqa_prefill": gqa_prefill,
    "gqa_attention+decode": lambda: gqa_attention(1),
    "gqa_attention+mask": lambda: gqa_attention(3),
    "reshape_and_cache": reshape_and_cache,
    "mla_cache": mla_cache,
    "moe_route": lambda: moe_route(False),
    "moe_route+grouped": lambda: moe_route(True),
    "moe_dispatch": moe_dispatch,
    "grouped_gemm": grouped_gemm,
    "moe_combine": moe_combine,
    "fused_moe": fused_moe,
    "w8a8_gemm": w8a8_gemm,
    "w4a16_gemm": w4a16_gemm,
    "fp8_block_gemm": fp8_block_gemm,
    "w8a8_linear": w8a8_linear,
    "fp8_block_linear": fp8_block_linear,
    "quantize_activation_per_token_int8": quantize_int8,
}
