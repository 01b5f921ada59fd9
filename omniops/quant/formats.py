"""Quantized weight formats and the quantize / dequantize helpers (pure torch; any device).

Three schemes, each an explicit dataclass holding exactly what the GEMM kernels read:

``int8_channel`` (:class:`Int8ChannelWeight`, W8A8)
    ``qweight`` int8 ``[N, K]``, ``scale`` float32 ``[N]``; ``w ~= qweight * scale[:, None]`` (symmetric,
    values -127..127, ``scale = amax(|w[n]|) / 127``). Activations are quantized per token at run time by
    :func:`quantize_activation_per_token_int8`: ``x_q`` int8 ``[..., K]`` and ``x_scale`` float32 ``[..., 1]``.
    The GEMM accumulates int8 x int8 in int32 (exact for K <= 131071) and scales in fp32.

``int4_group`` (:class:`Int4GroupWeight`, W4A16)
    ``packed`` uint8 ``[N, K // 2]``: byte ``packed[n, j]`` holds ``q[n, 2j]`` in its LOW nibble and
    ``q[n, 2j + 1]`` in its HIGH nibble, each an unsigned code 0..15. ``scales`` float32 ``[N, K // G]`` and
    ``zeros`` uint8 ``[N, K // G]`` (codes 0..15) or None; ``w[n, k] = (q[n, k] - z) * scales[n, k // G]``
    with ``z = zeros[n, k // G]`` (asymmetric: ``scale = (max - min) / 15``) or ``z = 8`` (symmetric: codes
    are offset-binary, values -8..7, ``scale = amax / 7.5``; the half step beyond 7 is clamped).
    G (``group_size``) is 32, 64 or 128 and must divide K. Activations stay floating point.

``fp8_block`` (:class:`Fp8BlockWeight`, DeepSeek-V3's checkpoint layout)
    ``qweight`` float8_e4m3fn ``[N, K]`` and ``scale`` float32 ``[ceil(N/128), ceil(K/128)]`` (DeepSeek's
    ``weight_scale_inv``): ``w[n, k] = qweight[n, k] * scale[n // 128, k // 128]``. Activations are
    quantized per token per 128-wide group of K by :func:`quantize_activation_fp8_group`: ``x_q``
    float8_e4m3fn ``[..., K]`` and ``x_scale`` float32 ``[..., ceil(K/128)]`` (``x ~= x_q * x_scale``).

All-zero rows / groups get scale 0 and codes 0 (int4 asymmetric: zero point 0), so they dequantize to exact
zeros - never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from omniops import _ext
from omniops._registry import eager_direct
from omniops._validation import check_tensor

SCHEMES = ("int8_channel", "int4_group", "fp8_block")
INT4_GROUP_SIZES = (32, 64, 128)
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX_K = 131071  # int32 accumulation of int8 x int8 products is exact up to this K (K * 128 * 128 < 2**31)


@dataclass
class Int8ChannelWeight:
    """W8A8 weight: ``qweight`` int8 [N, K], ``scale`` float32 [N] (one per output channel)."""

    qweight: Tensor
    scale: Tensor
    scheme: str = "int8_channel"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]


@dataclass
class Int4GroupWeight:
    """W4A16 weight: ``packed`` uint8 [N, K/2] (low nibble = even k), ``scales`` float32 [N, K/G],
    ``zeros`` uint8 [N, K/G] (0..15) or None (symmetric, implicit zero point 8)."""

    packed: Tensor
    scales: Tensor
    zeros: Tensor | None
    group_size: int
    scheme: str = "int4_group"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.packed.shape[1] * 2)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None


@dataclass
class Fp8BlockWeight:
    """FP8 block-scaled weight: ``qweight`` float8_e4m3fn [N, K], ``scale`` float32 [ceil(N/128), ceil(K/128)]."""

    qweight: Tensor
    scale: Tensor
    block: int = FP8_BLOCK
    scheme: str = "fp8_block"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]


QuantizedWeight = Int8ChannelWeight | Int4GroupWeight | Fp8BlockWeight


def _safe(scale: Tensor) -> Tensor:
    """Divisor for quantization: a zero scale (all-zero row/group) divides by 1, so codes are 0, not NaN."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _check_weight(w: Tensor) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"w: expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D weight [N, K], got shape {list(w.shape)}")
    if not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"w: expected a float32/float16/bfloat16 weight, got {w.dtype}")


# ---- int8 ------------------------------------------------------------------------------------------------
def quantize_int8_channel(w: Tensor) -> Int8ChannelWeight:
    _check_weight(w)
    wf = w.float()
    scale = wf.abs().amax(dim=1) / 127.0
    q = torch.round(wf / _safe(scale)[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8ChannelWeight(q.contiguous(), scale.contiguous())


def quantize_activation_per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token quantization: ``x_q`` int8 [..., K], ``x_scale`` float32 [..., 1] with
    ``x ~= x_q * x_scale`` and ``x_scale = amax(|x|, -1) / 127`` (0 for an all-zero row).

    Eager CPU float32/16/bf16 tensors take one fused C++ pass (``omniops._C.quantize_per_token_int8``, same
    arithmetic); otherwise (GPU, tracing, other dtypes) the torch ops below run. A helper, not an omni op: there is
    no backend to choose (``use_backend`` does not apply); ``w8a8_linear`` quantizes inside the op instead.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x: expected a floating-point tensor with at least 1 dimension")
    check_tensor("x", x)  # (a stride-0 view past the int64 byte range, a lazy neg / conj bit)
    C = _ext.cpp()
    if (C is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and x.shape[-1] > 0 and eager_direct((x,))):
        q, s = C.quantize_per_token_int8(x.reshape(-1, x.shape[-1]))
        return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)
    return quantize_per_token_int8_torch(x)


def quantize_per_token_int8_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    """The torch-op form of :func:`quantize_activation_per_token_int8` (what the oracles and traced graphs run;
    the ``quant_linear`` graph pass matches exactly this formula)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0 if x.shape[-1] > 0 else xf.new_zeros(*x.shape[:-1], 1)
    q = torch.round(xf / _safe(scale)).clamp_(-127, 127).to(torch.int8)
    return q, scale


# ---- int4 ------------------------------------------------------------------------------------------------
def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 [N, K] (K even) -> uint8 [N, K/2]; low nibble = even k, high nibble = odd k."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [N, K/2] -> uint8 codes [N, K] (inverse of :func:`pack_int4`)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def quantize_int4_group(w: Tensor, group_size: int = 128, symmetric: bool = True) -> Int4GroupWeight:
    _check_weight(w)
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {INT4_GROUP_SIZES}, got {group_size!r}")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"w: K={k} must be a multiple of group_size={group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    if symmetric:
        # Codes -8..7 around zero point 8: scale so that the largest magnitude maps to 7.5 -> rounds inside.
        amax = g.abs().amax(dim=-1)
        scale = amax / 7.5
        codes = torch.round(g / _safe(scale)[..., None]).clamp_(-8, 7) + 8
        zeros = None
    else:
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / 15.0
        z = torch.round(-lo / _safe(scale)).clamp_(0, 15)
        codes = (torch.round(g / _safe(scale)[..., None]) + z[..., None]).clamp_(0, 15)
        zeros = z.to(torch.uint8).contiguous()
    packed = pack_int4(codes.reshape(n, k).to(torch.uint8))
    return Int4GroupWeight(packed, scale.contiguous(), zeros, group_size)


def dequantize_int4_group(packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int) -> Tensor:
    """float32 [N, K] from the int4_group layout: ``(code - zero) * scale``."""
    codes = unpack_int4(packed).float()
    n, k = codes.shape
    z = torch.full_like(scales, 8.0) if zeros is None else zeros.float()
    g = codes.reshape(n, k // group_size, group_size)
    return ((g - z[..., None]) * scales.float()[..., None]).reshape(n, k)


# ---- fp8 -------------------------------------------------------------------------------------------------
def _expand_blocks(scale: Tensor, rows: int, cols: int, block: int = FP8_BLOCK) -> Tensor:
    """[ceil(rows/b), ceil(cols/b)] -> [rows, cols] by repeating each block's scale."""
    return scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def quantize_fp8_block(w: Tensor, block: int = FP8_BLOCK) -> Fp8BlockWeight:
    _check_weight(w)
    if block != FP8_BLOCK:
        raise ValueError(f"block: only {FP8_BLOCK}x{FP8_BLOCK} blocks are supported (DeepSeek-V3), got {block}")
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    wf = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    wf[:n, :k] = w.float()
    amax = wf.reshape(nb, block, kb, block).abs().amax(dim=(1, 3))
    scale = amax / FP8_MAX
    q = (w.float() / _expand_blocks(_safe(scale), n, k)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8BlockWeight(q.contiguous(), scale.contiguous())


def dequantize_fp8_block(qweight: Tensor, scale: Tensor) -> Tensor:
    n, k = qweight.shape
    return qweight.float() * _expand_blocks(scale.float(), n, k)


def quantize_activation_fp8_group(x: Tensor, group: int = FP8_BLOCK) -> tuple[Tensor, Tensor]:
    """Per-token, per-``group``-wide slice of K: ``x_q`` float8_e4m3fn [..., K], ``x_scale`` float32
    [..., ceil(K/group)] with ``x ~= x_q * x_scale`` (repeated over each group); scale = amax / 448."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x: expected a floating-point tensor with at least 1 dimension")
    check_tensor("x", x)  # (a stride-0 view past the int64 byte range, a lazy neg / conj bit)
    if group != FP8_BLOCK:
        raise ValueError(f"group: only {FP8_BLOCK} is supported (the fp8_block GEMM's K block), got {group}")
    k = x.shape[-1]
    kb = math.ceil(k / group)
    lead = x.shape[:-1]
    xf = torch.zeros(*lead, kb * group, dtype=torch.float32, device=x.device)
    xf[..., :k] = x.float()
    g = xf.reshape(*lead, kb, group)
    # A literal, not FP8_MAX: with dynamic=True Dynamo turns a module-level float into a graph input, and the
    # quant_linear graph pass recognises this quantizer by its constant divisor.
    scale = g.abs().amax(dim=-1) / 448.0
    q = (g / _safe(scale)[..., None]).clamp_(-FP8_MAX, FP8_MAX).reshape(*lead, kb * group)[..., :k]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def dequantize_activation_fp8_group(x_q: Tensor, x_scale: Tensor, group: int = FP8_BLOCK) -> Tensor:
    k = x_q.shape[-1]
    return x_q.float() * x_scale.float().repeat_interleave(group, -1)[..., :k]


# ---- scheme dispatch -------------------------------------------------------------------------------------
def quantize_weight(w: Tensor, scheme: str, *, group_size: int = 128, symmetric: bool = True) -> QuantizedWeight:
    """Quantize a float weight ``[N, K]`` (nn.Linear layout) to ``scheme``.

    ``group_size`` / ``symmetric`` apply to ``int4_group`` only. Returns the scheme's dataclass.
    """
    if scheme == "int8_channel":
        return quantize_int8_channel(w)
    if scheme == "int4_group":
        return quantize_int4_group(w, group_size, symmetric)
    if scheme == "fp8_block":
        return quantize_fp8_block(w)
    raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")


def dequantize_weight(qw: QuantizedWeight) -> Tensor:
    """float32 ``[N, K]`` approximation of the original weight."""
    if isinstance(qw, Int8ChannelWeight):
        return qw.qweight.float() * qw.scale.float()[:, None]
    if isinstance(qw, Int4GroupWeight):
        return dequantize_int4_group(qw.packed, qw.scales, qw.zeros, qw.group_size)
    if isinstance(qw, Fp8BlockWeight):
        return dequantize_fp8_block(qw.qweight, qw.scale)
    raise TypeError(f"qw: expected Int8ChannelWeight, Int4GroupWeight or Fp8BlockWeight, got {type(qw).__name__}")
