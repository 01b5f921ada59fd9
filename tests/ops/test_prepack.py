"""Prepacked weights: the bf16 tile and fp32 panel layouts, the prepack cache, the tile kernels (AMX in the amx
library, vdpbf16ps / vpdpbusd in the avx512 one) and the fp32 panel kernels vs the row-major ones, and the
selection of the amx kernel library (cpuid + the OS's tile permission, OMNI_ISA)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import omniops
from omniops import _cpu, _ext
from omniops.ops import prepack
from omniops.reference import moe as ref
from omniops.testing import assert_close

needs_cpp = pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C is not built")


def _amx_reason() -> str | None:
    if _ext.cpp() is None:
        return "omniops._C is not built"
    info = omniops.cpu_info()
    if "amx" in info["available_isas"]:
        return None
    f = info["features"]
    if not (f.get("amx_tile") and f.get("amx_bf16")):
        return f"this CPU ({info['model']}) has no AMX-BF16 tiles"
    if not info.get("amx_permission"):
        return "the OS refused the AMX tile permission (arch_prctl ARCH_REQ_XCOMP_PERM)"
    return "libomni_kernels_amx.so was not built (the compiler lacks -mamx-tile)"


needs_amx = pytest.mark.skipif(_amx_reason() is not None, reason=str(_amx_reason()))


def test_pack_layout_is_the_documented_one() -> None:
    B, N, K = 2, 37, 70  # neither a multiple of the tile
    w = torch.randn(B, N, K).bfloat16()
    t = prepack.pack_bf16_tiles(w)
    assert t.shape == (B, 3, 3, 512)
    tiles = t.view(B, 3, 3, 16, 16, 2)
    for b, n, k in [(0, 0, 0), (1, 36, 69), (0, 17, 33), (1, 5, 64)]:
        assert tiles[b, n // 16, k // 32, (k % 32) // 2, n % 16, k % 2] == w[b, n, k]
    assert tiles[0, 2, :, :, 5:].abs().sum() == 0  # padding columns n >= 37
    assert tiles[0, :, 2, 3:].abs().sum() == 0  # padding K >= 70


def test_prepack_cache_hits_views_and_repacks_after_writes() -> None:
    prepack.clear_cache()
    w = torch.randn(3, 48, 64).bfloat16()
    a = prepack.prepack_linear_weight(w)
    assert prepack.prepack_linear_weight(w) is a
    w2 = torch.randn(48, 64).bfloat16()
    v = prepack.prepack_linear_weight(w2.unsqueeze(0))
    assert prepack.prepack_linear_weight(w2.unsqueeze(0)) is v  # a fresh view of a live weight still hits
    with torch.no_grad():
        w.mul_(2)
    b = prepack.prepack_linear_weight(w)
    assert b is not a and torch.equal(b, prepack.pack_bf16_tiles(w))
    n = len(prepack._cache)
    del w, a, b
    assert len(prepack._cache) == n - 1  # the entry dies with its weight


def test_prepack_cache_hits_fresh_tensors_without_a_base(monkeypatch) -> None:
    # compiled graphs pass parameters as fresh tensors with no ``_base`` (like ``detach()``) on every call; the
    # entry must live as long as the weight's storage, or every call repacks the weight (a whole pass over it)
    prepack.clear_cache()
    packs = []
    real = prepack.pack_bf16_tiles
    monkeypatch.setattr(prepack, "pack_bf16_tiles", lambda t: packs.append(1) or real(t))
    w = torch.randn(48, 64).bfloat16()
    with torch.inference_mode():
        first = prepack.prepack_linear_weight(w.detach())
        for _ in range(3):
            assert prepack.prepack_linear_weight(w.detach()) is first
    assert len(packs) == 1
    del w, first
    assert not prepack._cache  # and it still dies with the weight


def test_panel_layouts_are_the_documented_ones() -> None:
    B, N, K = 2, 37, 70  # N not a multiple of the panel
    w = torch.randn(B, N, K)
    p = prepack.pack_f32_panels(w)
    assert p.shape == (B, 2, K, 32)
    for b, n, k in [(0, 0, 0), (1, 36, 69), (0, 17, 33), (1, 32, 5)]:
        assert p[b, n // 32, k, n % 32] == w[b, n, k]
    assert p[:, 1, :, 5:].abs().sum() == 0  # padding columns n >= 37
    E, inter, H = 3, 21, 40  # I not a multiple of 16
    w13 = torch.randn(E, 2 * inter, H)
    g = prepack.pack_f32_gate_up_panels(w13)
    assert g.shape == (E, 2, H, 32)
    for e, i, h in [(0, 0, 0), (2, 20, 39), (1, 16, 7), (1, 15, 11)]:
        assert g[e, i // 16, h, i % 16] == w13[e, i, h]  # gate row i
        assert g[e, i // 16, h, 16 + i % 16] == w13[e, inter + i, h]  # up row i
    assert g[:, 1, :, 5:16].abs().sum() == 0 and g[:, 1, :, 21:].abs().sum() == 0  # padding rows i >= 21


def test_prepack_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="bfloat16.*float32"):
        omniops.prepack_moe_weights(torch.randn(2, 8, 4).half(), torch.randn(2, 4, 4).half())
    with pytest.raises(ValueError, match="float32"):
        prepack.pack_f32_panels(torch.randn(2, 8, 4).bfloat16())


def _tile_isas() -> list[str]:
    """The libraries that compute the tile layouts and can run here (amx: AMX tiles; avx512: vdpbf16ps /
    vpdpbusd on the same layout)."""
    if _ext.cpp() is None:
        return []
    return [isa for isa in ("amx", "avx512") if isa in omniops.cpu_info()["available_isas"]]


_NO_TILES = ("no kernel library with tiled weights runs on this CPU (needs AVX512-BF16 + VNNI, or AMX): "
             f"{omniops.cpu_info()['model'] if _ext.cpp() is not None else 'omniops._C not built'}")
tile_isa = pytest.mark.parametrize("isa", _tile_isas() or [pytest.param("none", marks=pytest.mark.skip(_NO_TILES))])


_BF16_CASES = [
    (1, 256, 192, 8, 2, "random"), (16, 100, 37, 5, 3, "random"), (300, 64, 48, 4, 2, "random"),
    (600, 96, 40, 3, 1, "one_expert"),  # 600 rows of one expert: three row chunks
    (13, 2048, 64, 2, 1, "one_expert"),  # K of 64 tiles: several K passes with 13 rows (two row groups)
]
_FP32_CASES = [
    (1, 256, 192, 8, 2, "random"), (16, 100, 37, 5, 3, "random"),  # odd H, I not a multiple of 16
    (200, 64, 48, 2, 2, "random"),  # 100-200 rows per expert: several items, row groups of 8 and a rest
    (13, 600, 64, 2, 1, "one_expert"),  # K of 600: four 128-row K chunks of the panel and a short one
]


@tile_isa
@pytest.mark.parametrize(("dtype", "T", "H", "inter", "E", "k", "pattern"),
                         [(torch.bfloat16, *c) for c in _BF16_CASES] + [(torch.float32, *c) for c in _FP32_CASES])
def test_prepacked_match_rows_kernels_and_reference(isa, dtype, T, H, inter, E, k, pattern) -> None:
    """bf16 tiles and fp32 panels against the row-major kernel and the reference."""
    x = torch.randn(T, H).to(dtype)
    w13 = (torch.randn(E, 2 * inter, H) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter) / inter**0.5).to(dtype)
    ids = torch.zeros(T, k, dtype=torch.int32) if pattern == "one_expert" else \
        torch.rand(T, E).argsort(dim=1)[:, :k].to(torch.int32)
    weights = torch.softmax(torch.randn(T, k), dim=-1)
    expected = ref.fused_moe(x, w13, w2, weights, ids)
    with _cpu.force_isa(isa):
        t13, t2 = omniops.prepack_moe_weights(w13, w2)
        found = prepack.moe_tiles(w13, w2)  # fused_moe's lookup finds the same copies
        assert found is not None and found[0] is t13 and found[1] is t2
        out = torch.empty_like(x)
        _ext.cpp().fused_moe(out, x, w13, w2, weights, ids, "silu", None, t13, t2)
        assert torch.equal(omniops.fused_moe(x, w13, w2, weights, ids), out)  # the cached copies are used
        rows = torch.empty_like(x)
        _ext.cpp().fused_moe(rows, x, w13, w2, weights, ids, "silu", None, None, None)
    assert_close(out, expected)
    assert_close(out, rows)


@tile_isa
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_gemm_tiles_rows_outside_experts_are_zero(isa, dtype) -> None:
    x = torch.randn(50, 300).to(dtype)  # fp32: K of 300, three panel chunks
    w = (torch.randn(3, 40, 300) / 300**0.5).to(dtype)
    offs = torch.tensor([4, 10, 10, 45])
    expected = ref.grouped_gemm(x, w, offs)
    with _cpu.force_isa(isa):
        assert prepack.linear_tiles(w) is not None
        got = omniops.grouped_gemm(x, w, offs)
    assert_close(got, expected)
    assert got[:4].abs().sum() == 0 and got[45:].abs().sum() == 0


@tile_isa
@pytest.mark.parametrize(("M", "N", "K"), [(1, 40, 70), (17, 96, 200), (300, 33, 1000), (9, 16, 64 * 40)])
def test_w8a8_tiles_are_exact(isa, M, N, K) -> None:
    # extreme codes included: -128 activations and weights (x + 128 = 0 on the VNNI path), +127
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    x[0, : min(K, 8)] = -128
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    w[0, : min(K, 8)] = -128
    w[-1, :8] = 127
    xs, ws = torch.rand(M) + 0.5, torch.rand(N) * 0.01
    with _cpu.force_isa(isa):
        tiles = prepack.i8_tiles(w)
        assert tiles is not None
        got = torch.empty(M, N, dtype=torch.int32)
        _ext.cpp().w8a8_gemm(got, x, torch.ones(M), w, torch.ones(N), None, tiles)
        y = torch.empty(M, N, dtype=torch.bfloat16)
        _ext.cpp().w8a8_gemm(y, x, xs, w, ws, None, tiles)
        y_rows = torch.empty(M, N, dtype=torch.bfloat16)
        _ext.cpp().w8a8_gemm(y_rows, x, xs, w, ws, None, None)
    assert torch.equal(got, x.int() @ w.int().T)
    assert torch.equal(y, y_rows)  # exact int32 sums, the same epilogue


@pytest.mark.skipif(_ext.cpp() is None or "avx2" not in _cpu.available_isas(), reason="needs the avx2 library")
def test_tiles_need_a_tile_library() -> None:
    x, w13, w2 = torch.randn(2, 64).bfloat16(), torch.randn(2, 32, 64).bfloat16(), torch.randn(2, 64, 16).bfloat16()
    t13, t2 = prepack.prepack_moe_weights(w13, w2)
    ids, weights = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1)
    with _cpu.force_isa("avx2"), pytest.raises(ValueError, match="amx or avx512 kernel library"):
        _ext.cpp().fused_moe(torch.empty_like(x), x, w13, w2, weights, ids, "silu", None, t13, t2)
    f13, f2 = w13.float(), w2.float()
    p13, p2 = prepack.prepack_moe_weights(f13, f2)
    with _cpu.force_isa("avx2"):
        assert prepack.moe_tiles(f13, f2) is None
        with pytest.raises(ValueError, match="fp32 panels need the amx or avx512"):
            _ext.cpp().fused_moe(x.float(), x.float(), f13, f2, weights, ids, "silu", None, p13, p2)
    for isa in _tile_isas():
        with _cpu.force_isa(isa):
            with pytest.raises(TypeError, match="w13_tiles: .*float32 panels"):
                _ext.cpp().fused_moe(x.half(), x.half(), w13.half(), w2.half(), weights, ids, "silu", None, t13, t2)
            with pytest.raises(TypeError, match="w13_tiles: expected dtype float32"):  # bf16 tiles, fp32 x
                _ext.cpp().fused_moe(x.float(), x.float(), f13, f2, weights, ids, "silu", None, t13, t2)
    for isa in _tile_isas():
        with _cpu.force_isa(isa), pytest.raises(ValueError, match="w2_tiles"):
            _ext.cpp().fused_moe(torch.empty_like(x), x, w13, w2, weights, ids, "silu", None, t13, t13)


@needs_cpp
def test_amx_library_is_offered_only_with_tiles_and_permission() -> None:
    info = omniops.cpu_info()
    f = info["features"]
    can = bool(f["amx_tile"] and f["amx_bf16"] and f["amx_int8"] and info["amx_permission"]
               and "avx512" in info["available_isas"])
    if can and "amx" not in info["available_isas"]:
        pytest.skip(_amx_reason())
    assert ("amx" in info["available_isas"]) == can
    if not can:
        with pytest.raises(ValueError, match="cannot run on this CPU"):
            _ext.cpp().set_isa("amx")


@needs_cpp
@pytest.mark.parametrize("isa", ["amx", "avx512", "avx2", "generic"])
def test_omni_isa_env_selects_the_library(isa: str) -> None:
    code = "import omniops; print(omniops.cpu_info()['isa'])"
    env = dict(os.environ, OMNI_ISA=isa)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if isa in _cpu.available_isas():
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == isa
    else:
        assert r.returncode != 0 and "cannot run on this CPU" in r.stderr
