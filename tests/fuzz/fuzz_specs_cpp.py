"""Valid baseline calls of every omniops._C entry point, the seeds the fuzz suite mutates.

Each ``Call`` names the entry point, its keyword arguments (all of them, in signature order), which tensors it
writes, which (output, input) pairs it documents as in-place, the valid value range of its index tensors and the
scalar values it must refuse. Sizes are small and odd; every tensor sits in a sentinel-padded buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from fuzz_tensors import padded

I32, I64, F32 = torch.int32, torch.int64, torch.float32


@dataclasses.dataclass
class Call:
    fn: str
    args: dict[str, Any]
    outputs: tuple[str, ...] = ()
    inplace: tuple[tuple[str, str], ...] = ()
    ranges: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # index tensor -> [lo, hi)
    optional: tuple[str, ...] = ()  # tensor arguments that may be None
    reject: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)  # scalar -> values to refuse
    public: bool = False  # a public op: meta tensors (the reference runs on them) and lazy neg views are valid


def _t(shape, dtype=F32, fill="randn"):
    return padded(shape, dtype, fill)


def _ints(values, dtype=I32):
    t = padded((len(values),), dtype, "zeros")
    t.copy_(torch.tensor(values, dtype=dtype))
    return t


def _table(rows):
    t = padded((len(rows), len(rows[0])), I32, "zeros")
    t.copy_(torch.tensor(rows, dtype=I32))
    return t


# ---- norm, activation, rotary ---------------------------------------------------------------------------------
def rms_norm(residual: bool) -> Call:
    a = {"out": _t((3, 20), fill="zeros"), "x": _t((3, 20)), "weight": _t((20,)), "eps": 1e-6,
         "residual": _t((3, 20)) if residual else None, "residual_out": _t((3, 20), fill="zeros") if residual else None}
    return Call("rms_norm", a, ("out", "residual_out"), (("out", "x"), ("residual_out", "residual")),
                optional=("residual", "residual_out"), reject={"eps": (-1.0,)})


def silu_and_mul() -> Call:
    return Call("silu_and_mul", {"out": _t((3, 12), fill="zeros"), "x": _t((3, 24))}, ("out",))


def rotary(neox: bool) -> Call:
    a = {"positions": _ints([0, 5, 2], I64), "q": _t((3, 2, 16)), "k": _t((3, 1, 16)), "cos_sin_cache": _t((7, 8)),
         "rotary_dim": 8, "is_neox": neox, "q_out": _t((3, 2, 16), fill="zeros"), "k_out": _t((3, 1, 16), fill="zeros")}
    return Call("rotary_embedding", a, ("q_out", "k_out"), (("q_out", "q"), ("k_out", "k")),
                ranges={"positions": (0, 7)}, reject={"rotary_dim": (0, 7, 18)})


# ---- attention --------------------------------------------------------------------------------------------------
def _paged(nb=6, bs=4, h=2, d=16):
    return _t((nb, bs, h, d)), _t((nb, bs, h, d))


def gqa_decode() -> Call:
    kc, vc = _paged()
    a = {"out": _t((2, 4, 16), fill="zeros"), "q": _t((2, 4, 16)), "k_cache": kc, "v_cache": vc,
         "block_table": _table([[3, 1, 0], [2, 5, 4]]), "seq_lens": _ints([9, 6]), "scale": 0.25, "soft_cap": 0.0,
         "window": 0}
    return Call("gqa_decode", a, ("out",), ranges={"block_table": (0, 6), "seq_lens": (0, 13)},
                reject={"soft_cap": (-1.0,), "window": (-1,)})


def mla_decode() -> Call:
    a = {"out": _t((2, 3, 24), fill="zeros"), "q": _t((2, 3, 40)), "kv_cache": _t((5, 4, 40)),
         "block_table": _table([[4, 0], [1, 3]]), "seq_lens": _ints([7, 3]), "scale": 0.2, "v_dim": 24}
    return Call("mla_decode", a, ("out",), ranges={"block_table": (0, 5), "seq_lens": (0, 9)},
                reject={"v_dim": (0, -1, 41)})


def gqa_prefill(paged: bool) -> Call:
    kc, vc = _paged()
    a = {"out": _t((7, 4, 16), fill="zeros"), "q": _t((7, 4, 16)), "k": _t((7, 2, 16)), "v": _t((7, 2, 16)),
         "cu_seqlens": _ints([0, 3, 7]), "causal": True, "scale": 0.25,
         "k_cache": kc if paged else None, "v_cache": vc if paged else None,
         "block_table": _table([[1, 0], [5, 2]]) if paged else None, "context_lens": _ints([5, 2]) if paged else None}
    ranges = {"block_table": (0, 6), "context_lens": (0, 9)} if paged else {}
    return Call("gqa_prefill", a, ("out",), ranges=ranges,
                optional=("k_cache", "v_cache", "block_table", "context_lens"))


def dense_attention(q_len: int, mask: torch.dtype | None) -> Call:
    L = 9
    m = None
    if mask == torch.bool:
        m = padded((2, 1, q_len, L), torch.bool, "zeros")
        m.copy_(torch.rand(2, 1, q_len, L) > 0.3)
    elif mask is not None:
        m = _t((1, 4, q_len, L))
    a = {"out": _t((2, 4, q_len, 12), fill="zeros"), "q": _t((2, 4, q_len, 16)), "k": _t((2, 2, L, 16)),
         "v": _t((2, 2, L, 12)), "attn_mask": m, "causal": q_len > 1, "scale": 0.25}
    return Call("dense_attention", a, ("out",), optional=("attn_mask",))


def reshape_and_cache() -> Call:
    kc, vc = _paged()
    a = {"key": _t((5, 2, 16)), "value": _t((5, 2, 16)), "k_cache": kc, "v_cache": vc,
         "slot_mapping": _ints([0, 7, -1, 23, 12], I64)}
    return Call("reshape_and_cache", a, ("k_cache", "v_cache"), ranges={"slot_mapping": (-1, 24)})


def mla_cache() -> Call:
    a = {"kv_c": _t((5, 32)), "k_pe": _t((5, 8)), "kv_cache": _t((6, 4, 40)),
         "slot_mapping": _ints([3, -1, 0, 23, 9], I64)}
    return Call("mla_cache", a, ("kv_cache",), ranges={"slot_mapping": (-1, 24)})


# ---- moe ----------------------------------------------------------------------------------------------------
def _ids(rows, dtype=I32):
    t = padded((len(rows), len(rows[0])), dtype, "zeros")
    t.copy_(torch.tensor(rows, dtype=dtype))
    return t


def moe_route(grouped: bool) -> Call:
    a = {"topk_weights": _t((5, 2), fill="zeros"), "topk_ids": _t((5, 2), I32, "zeros"), "router_logits": _t((5, 8)),
         "top_k": 2, "scoring": "sigmoid" if grouped else "softmax", "renormalize": True,
         "num_groups": 4 if grouped else 0, "topk_groups": 2 if grouped else 0,
         "correction_bias": _t((8,)) if grouped else None, "routed_scaling": 2.5 if grouped else 1.0}
    return Call("moe_route", a, ("topk_weights", "topk_ids"), optional=("correction_bias",),
                reject={"top_k": (0, 9), "num_groups": (-1, 3), "scoring": ("bogus",)})


def moe_dispatch(block_size: int) -> Call:
    T, k, E, H = 3, 2, 4, 8
    M = T * k + E * (block_size - 1)
    a = {"x_sorted": _t((M, H), fill="zeros"), "sorted_token_ids": _t((M,), I32, "zeros"),
         "expert_offsets": _t((E + 1,), I64, "zeros"), "expert_counts": _t((E,), I32, "zeros"),
         "inverse_index": _t((T, k), I32, "zeros"), "hidden": _t((T, H)), "topk_ids": _ids([[0, 3], [1, 0], [3, 2]]),
         "num_experts": E, "block_size": block_size}
    return Call("moe_dispatch", a, ("x_sorted", "sorted_token_ids", "expert_offsets", "expert_counts", "inverse_index"),
                ranges={"topk_ids": (0, E)}, reject={"num_experts": (0, -1), "block_size": (0, -1)})


def grouped_gemm() -> Call:
    a = {"out": _t((7, 6), fill="zeros"), "x_sorted": _t((7, 8)), "w": _t((3, 6, 8)),
         "expert_offsets": _ints([0, 2, 2, 6], I64), "w_tiles": None}
    return Call("grouped_gemm", a, ("out",), optional=("w_tiles",))


def moe_combine() -> Call:
    a = {"out": _t((3, 8), fill="zeros"), "expert_out": _t((7, 8)), "topk_weights": _t((3, 2)),
         "inverse_index": _ids([[0, 6], [-1, 2], [3, 4]])}
    return Call("moe_combine", a, ("out",), ranges={"inverse_index": (-1, 7)})


def fused_moe(mapped: bool) -> Call:
    a = {"out": _t((3, 16), fill="zeros"), "hidden": _t((3, 16)), "w13": _t((4, 10, 16)), "w2": _t((4, 16, 5)),
         "topk_weights": _t((3, 2)),
         "topk_ids": _ids([[0, 3], [1, 0], [3, 2]] if not mapped else [[0, 5], [1, 4], [5, 2]]),
         "activation": "silu", "expert_map": _ints([2, -1, 0, 1, 3, -1]) if mapped else None,
         "w13_tiles": None, "w2_tiles": None}
    ranges = {"topk_ids": (0, 6 if mapped else 4)}
    if mapped:
        ranges["expert_map"] = (-1, 4)
    return Call("fused_moe", a, ("out",), (("out", "hidden"),), ranges=ranges,
                optional=("expert_map", "w13_tiles", "w2_tiles"), reject={"activation": ("gelu",)})


# ---- quantized GEMMs ----------------------------------------------------------------------------------------
def _i8(shape):
    t = padded(shape, torch.int8, "zeros")
    t.copy_(torch.randint(-127, 128, shape, dtype=torch.int8))
    return t


def _u8(shape, hi=256):
    t = padded(shape, torch.uint8, "zeros")
    t.copy_(torch.randint(0, hi, shape, dtype=torch.uint8))
    return t


def _f8(shape):
    t = padded(shape, torch.float8_e4m3fn, "zeros")
    t.copy_((torch.randn(shape) * 4).to(torch.float8_e4m3fn))
    return t


def quantize_per_token_int8() -> Call:
    return Call("quantize_per_token_int8", {"x": _t((3, 40))})


def w8a8_gemm(bias: bool) -> Call:
    a = {"out": _t((3, 5), fill="zeros"), "x_q": _i8((3, 40)), "x_scale": padded((3,), fill=0.02),
         "w_q": _i8((5, 40)), "w_scale": padded((5,), fill=0.03), "bias": _t((5,)) if bias else None, "w_tiles": None}
    return Call("w8a8_gemm", a, ("out",), optional=("bias", "w_tiles"))


def w4a16_gemm(zeros: bool) -> Call:
    a = {"out": _t((3, 5), fill="zeros"), "x": _t((3, 64)), "w_packed": _u8((5, 32)),
         "scales": padded((5, 2), fill=0.1),
         "zeros": _u8((5, 2), 16) if zeros else None, "group_size": 32, "bias": _t((5,)) if zeros else None}
    return Call("w4a16_gemm", a, ("out",), optional=("zeros", "bias"), ranges={"zeros": (0, 16)} if zeros else {},
                reject={"group_size": (0, 48, 16)})


def fp8_block_gemm() -> Call:
    a = {"out": _t((3, 5), fill="zeros"), "x_q": _f8((3, 130)), "x_scale": padded((3, 2), fill=0.5),
         "w_q": _f8((5, 130)), "w_scale": padded((1, 2), fill=0.25), "bias": _t((5,))}
    return Call("fp8_block_gemm", a, ("out",), optional=("bias",))


def w8a8_linear() -> Call:
    a = {"out": _t((3, 5), fill="zeros"), "x": _t((3, 40)), "w_q": _i8((5, 40)), "w_scale": padded((5,), fill=0.03),
         "bias": None, "w_tiles": None}
    return Call("w8a8_linear", a, ("out",), optional=("bias", "w_tiles"))


def fp8_block_linear() -> Call:
    a = {"out": _t((3, 5), fill="zeros"), "x": _t((3, 130)), "w_q": _f8((5, 130)), "w_scale": padded((1, 2), fill=0.25),
         "bias": _t((5,))}
    return Call("fp8_block_linear", a, ("out",), optional=("bias",))


def set_isa() -> Call:
    return Call("set_isa", {"isa": "generic"}, reject={"isa": ("bogus", "AVX2")})


# name -> baseline builder (called afresh for every case: the tensors are padded per case)
BASELINES: dict[str, Callable[[], Call]] = {
    "rms_norm": lambda: rms_norm(False),
    "rms_norm+residual": lambda: rms_norm(True),
    "silu_and_mul": silu_and_mul,
    "rotary_embedding": lambda: rotary(True),
    "rotary_embedding+gptj": lambda: rotary(False),
    "gqa_decode": gqa_decode,
    "mla_decode": mla_decode,
    "gqa_prefill": lambda: gqa_prefill(False),
    "gqa_prefill+paged": lambda: gqa_prefill(True),
    "dense_attention+decode": lambda: dense_attention(1, None),
    "dense_attention+bool_mask": lambda: dense_attention(3, torch.bool),
    "dense_attention+float_mask": lambda: dense_attention(3, torch.float32),
    "reshape_and_cache": reshape_and_cache,
    "mla_cache": mla_cache,
    "moe_route": lambda: moe_route(False),
    "moe_route+grouped": lambda: moe_route(True),
    "moe_dispatch": lambda: moe_dispatch(1),
    "moe_dispatch+blocks": lambda: moe_dispatch(4),
    "grouped_gemm": grouped_gemm,
    "moe_combine": moe_combine,
    "fused_moe": lambda: fused_moe(False),
    "fused_moe+expert_map": lambda: fused_moe(True),
    "quantize_per_token_int8": quantize_per_token_int8,
    "w8a8_gemm": lambda: w8a8_gemm(False),
    "w8a8_gemm+bias": lambda: w8a8_gemm(True),
    "w4a16_gemm": lambda: w4a16_gemm(False),
    "w4a16_gemm+zeros": lambda: w4a16_gemm(True),
    "fp8_block_gemm": fp8_block_gemm,
    "w8a8_linear": w8a8_linear,
    "fp8_block_linear": fp8_block_linear,
    "set_isa": set_isa,
}
