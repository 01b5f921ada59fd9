"""Weights prepacked once into the AMX tile layout (bf16) or column panels (fp32), cached on the weight.

The ``amx`` kernel library multiplies bf16 weights with AMX tiles (tdpbf16ps); the ``avx512`` one (AVX512-BF16
+ VNNI, e.g. AMD Zen 4/5) runs vdpbf16ps / vpdpbusd outer products on the same layout. A B tile is 16 K-pairs x
16 columns, so the kernels want each weight matrix ``[N, K]`` rearranged into contiguous 1 KiB tiles
(``OMNI_W_TILES_BF16`` in ascendc/include/omni/ops/moe.h): ``[ceil(N/16), ceil(K/32), 16, 16, 2]`` with
element ``[nb][kb][k2][n][p] = W[16 nb + n][32 kb + 2 k2 + p]``, zero-padded. Packing costs one pass over the
weights, so it is done once per weight and cached:

* ``prepack_moe_weights(w13, w2)`` / ``prepack_linear_weight(w)`` pack now (the model loader calls these so the
  first request does not pay for it) and return the packed tensors;
* ``fused_moe`` / ``grouped_gemm`` look the cache up on every bf16 call on those libraries and pack on a
  miss, so callers that never prepack still get the tile kernels.

fp32 weights get column panels instead (``OMNI_W_PANELS_F32``): ``[ceil(N/32), K, 32]`` per matrix, element
``[nb][k][n] = W[32 nb + n][k]``, zero-padded in N, which the AVX-512 libraries multiply as outer products (one
sequential weight stream per 32 output columns, no horizontal sums); an MoE layer's ``w13`` pairs 16 gate rows
with the same 16 up rows per panel (``[E, ceil(I/16), H, 32]``).

The cache holds a weak reference to the weight: an entry dies with its weight, and an in-place update of the
weight (its version counter moves) makes the entry stale, so it is repacked. The packed copy doubles the
weights' memory while the row-major tensor is alive (the kernels take the row-major tensor for its shape only).
``OMNI_TILES=0`` turns the tile path off (the libraries then run their row-major kernels).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from omniops import _ext
from omniops._backends import env

_TILES_BF16 = 1 << 1  # bit of OMNI_W_TILES_BF16 in the library's weight_layouts
_PANELS_F32 = 1 << 2  # bit of OMNI_W_PANELS_F32 in the same (MoE / grouped-GEMM) table
_TILES_I8 = 1 << 2  # bit of OMNI_W_TILES_I8 in the quantized-GEMM library's weight_layouts
_cache: dict[tuple, tuple[weakref.ref, int, Tensor]] = {}


def pack_bf16_tiles(w: Tensor) -> Tensor:
    """``[B, N, K]`` bf16 -> ``[B, ceil(N/16), ceil(K/32), 512]`` (the tile layout above). Pure torch."""
    if w.dtype != torch.bfloat16 or w.dim() != 3:
        raise ValueError(f"pack_bf16_tiles: expected a 3-D bfloat16 tensor [B, N, K], got {w.dtype} "
                         f"{list(w.shape)}")
    B, N, K = w.shape
    n_pad, k_pad = -N % 16, -K % 32
    if n_pad or k_pad:
        w = F.pad(w, (0, k_pad, 0, n_pad))
    nb, kb = (N + n_pad) // 16, (K + k_pad) // 32
    # [B, nb, n(16), kb, k2(16), p(2)] -> [B, nb, kb, k2, n, p]
    t = w.reshape(B, nb, 16, kb, 16, 2).permute(0, 1, 3, 4, 2, 5)
    return t.contiguous().view(B, nb, kb, 512)


def pack_f32_panels(w: Tensor) -> Tensor:
    """``[B, N, K]`` fp32 -> ``[B, ceil(N/32), K, 32]`` (the panel layout above). Pure torch."""
    if w.dtype != torch.float32 or w.dim() != 3:
        raise ValueError(f"pack_f32_panels: expected a 3-D float32 tensor [B, N, K], got {w.dtype} {list(w.shape)}")
    B, N, K = w.shape
    w = F.pad(w, (0, 0, 0, -N % 32))
    return w.reshape(B, -1, 32, K).transpose(2, 3).contiguous()


def pack_f32_gate_up_panels(w13: Tensor) -> Tensor:
    """An MoE layer's ``w13 [E, 2I, H]`` fp32 -> ``[E, ceil(I/16), H, 32]``: panel p holds gate rows 16p..16p+15
    in columns 0-15 and the same up rows in 16-31 (the fused kernel's silu(gate) * up pairs). Pure torch."""
    if w13.dtype != torch.float32 or w13.dim() != 3 or w13.shape[1] % 2:
        raise ValueError(f"pack_f32_gate_up_panels: expected a float32 tensor [E, 2*I, H], got {w13.dtype} "
                         f"{list(w13.shape)}")
    E, two_i, H = w13.shape
    inter = two_i // 2
    halves = [F.pad(h, (0, 0, 0, -inter % 16)).reshape(E, -1, 16, H) for h in (w13[:, :inter], w13[:, inter:])]
    return torch.cat(halves, dim=2).transpose(2, 3).contiguous()


def pack_i8_tiles(w: Tensor) -> Tensor:
    """``[N, K]`` int8 -> ``[ceil(N/16), ceil(K/64), 1024]`` for AMX tdpbssd: element ``[nb][kb][k4][n][p] =
    w[16 nb + n][64 kb + 4 k4 + p]``, zero-padded (OMNI_W_TILES_I8). Pure torch."""
    if w.dtype != torch.int8 or w.dim() != 2:
        raise ValueError(f"pack_i8_tiles: expected a 2-D int8 tensor [N, K], got {w.dtype} {list(w.shape)}")
    N, K = w.shape
    n_pad, k_pad = -N % 16, -K % 64
    if n_pad or k_pad:
        w = F.pad(w, (0, k_pad, 0, n_pad))
    nb, kb = (N + n_pad) // 16, (K + k_pad) // 64
    t = w.reshape(nb, 16, kb, 16, 4).permute(0, 2, 3, 1, 4)  # [nb, kb, k4, n, p]
    return t.contiguous().view(nb, kb, 1024)


def i8_tiles(w_q: Tensor) -> Tensor | None:
    """The cached AMX-INT8 tiles of a W8A8 weight ``[N, K]`` (packed on first use), or None where the active
    library does not take them."""
    C = _ext.cpp()
    if (w_q.dtype != torch.int8 or C is None or env("OMNI_TILES") == "0"
            or not C.w8a8_tile_layouts() & _TILES_I8):
        return None
    return _cached(w_q, "i8", pack_i8_tiles)


def tiles_active(bit: int = _TILES_BF16) -> bool:
    """True when the active kernel library takes that prepacked layout (bf16 tiles, by default, or fp32
    panels: amx, avx512) and OMNI_TILES allows it."""
    C = _ext.cpp()
    return C is not None and env("OMNI_TILES") != "0" and bool(C.tile_layouts() & bit)


def _key(w: Tensor, tag: str) -> tuple:
    return (tag, w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype)


def _version(w: Tensor) -> int:
    # inference tensors (views made under torch.inference_mode, e.g. W[None] inside a compiled graph) keep no
    # version counter; their memory belongs to a normal weight, whose writes outside inference mode repack
    return -1 if w.is_inference() else w._version


def _cached(w: Tensor, tag: str, pack) -> Tensor:
    # The weight object itself carries its tiles (attribute lookup, ~0.1 us): the common case of a parameter
    # passed as is. Views made per call (W[None]) go through the dict below.
    attr = "_omni_tiles_" + tag
    own = getattr(w, attr, None)
    if own is not None and own[0] == _version(w) and own[1] == w.data_ptr():
        return own[2]
    key = _key(w, tag)
    hit = _cache.get(key)
    if hit is not None:
        ref, version, packed = hit
        # A live referent means the memory at data_ptr is still that weight's; the version says whether it
        # was written since packing.
        if ref() is not None and _version(w) == version:
            return packed
    with torch.no_grad():
        packed = pack(w.detach())
    # Reference the memory's storage, not the tensor: callers often pass a fresh view per call (``W[None]``,
    # and compiled graphs' views of a parameter, which have no ``_base``), which would die (and drop the entry)
    # right after the call; every view shares the weight's storage object, which dies with the weight.
    _cache[key] = (weakref.ref(w.untyped_storage(), lambda _r, k=key: _cache.pop(k, None)), _version(w), packed)
    if w._base is None:
        setattr(w, attr, (_version(w), w.data_ptr(), packed))
    return packed


def prepack_moe_weights(w13: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """Pack (or fetch) an MoE layer's ``w13 [E, 2I, H]`` and ``w2 [E, H, I]``: bf16 into tiles, fp32 into panels.

    Returns ``(w13_tiles [2E, ceil(I/16), ceil(H/32), 512], w2_tiles [E, ceil(H/16), ceil(I/32), 512])`` for bf16,
    ``(w13_panels [E, ceil(I/16), H, 32], w2_panels [E, ceil(H/32), I, 32])`` for fp32; fused_moe finds them by
    the weights themselves, so passing them on is optional."""
    if w13.dtype != w2.dtype or w13.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"prepack_moe_weights: weights are packed from bfloat16 (tiles) or float32 (panels), got "
                         f"w13 {w13.dtype}, w2 {w2.dtype}")
    if w13.dim() != 3 or w13.shape[1] % 2:
        raise ValueError(f"prepack_moe_weights: w13 must be [E, 2*I, H], got {list(w13.shape)}")
    if w13.dtype == torch.float32:
        return _cached(w13, "p13", pack_f32_gate_up_panels), _cached(w2, "p2", pack_f32_panels)
    E, two_i, H = w13.shape
    t13 = _cached(w13, "w13", lambda w: pack_bf16_tiles(w.reshape(2 * E, two_i // 2, H)))
    t2 = _cached(w2, "w2", pack_bf16_tiles)
    return t13, t2


def prepack_linear_weight(w: Tensor) -> Tensor:
    """Pack (or fetch) a grouped / dense weight ``[E, N, K]`` or ``[N, K]``: bf16 tiles or fp32 panels."""
    if w.dtype == torch.float32:
        return _cached(w, "p", lambda t: pack_f32_panels(t if t.dim() == 3 else t.unsqueeze(0)))
    if w.dtype != torch.bfloat16:
        raise ValueError(f"prepack_linear_weight: weights are packed from bfloat16 or float32, got {w.dtype}")
    return _cached(w, "w", lambda t: pack_bf16_tiles(t if t.dim() == 3 else t.unsqueeze(0)))


_LAYOUT_BITS = {torch.bfloat16: _TILES_BF16, torch.float32: _PANELS_F32}  # weight dtype -> its packed layout


def _layout_bit(w: Tensor) -> int | None:
    return _LAYOUT_BITS.get(w.dtype)


def moe_tiles(w13: Tensor, w2: Tensor) -> tuple[Tensor, Tensor] | None:
    """The prepacked weights fused_moe should use (bf16 tiles, fp32 panels), or None (another dtype, or the
    active library takes none)."""
    bit = _layout_bit(w13)
    if bit is None or w2.dtype != w13.dtype or not tiles_active(bit):
        return None
    return prepack_moe_weights(w13, w2)


def linear_tiles(w: Tensor) -> Tensor | None:
    bit = _layout_bit(w)
    if bit is None or not tiles_active(bit):
        return None
    return prepack_linear_weight(w)


def clear_cache() -> None:
    _cache.clear()
