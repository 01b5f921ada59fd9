// AMX-BF16 building blocks of the expert GEMMs (the CPU's "cube unit"): tile configuration, the 32x32 tile
// product on prepacked weights (layout OMNI_W_TILES_BF16, see omni/ops/moe.h) and activation staging.
//
// Tile registers: 0-3 accumulate C (fp32, 16 rows x 16 columns each: two row blocks x two column blocks), 4-5
// hold the two A row blocks (16 rows x 32 bf16 of K), 6-7 the two B column blocks (16 K-pairs x 16 columns x 2).
// One K step is 4 tile loads + 4 tdpbf16ps. A work item streams one or two column blocks of a weight matrix
// (contiguous 1 KiB tiles along K) once from memory and reuses them from L2 for every 32-row block of its
// expert's tokens. All tiles are configured 16 x 64 B: an A block with fewer real rows computes garbage rows
// that the epilogue drops (AMX time does not depend on the row count that matters here, and one fixed
// configuration avoids an ldtilecfg per block).
//
// Only the amx library compiles the tile code (-mamx-tile -mamx-bf16); elsewhere kHaveTiles is false and the
// binding never passes tiled weights (the library's weight_layouts bit tells it).
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>

#include "host/kernel_operator.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_ps(), which -Wmaybe-uninitialized
// reports at every use; the values are fully written.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define OMNI_HAVE_AMX_TILES 1
#endif

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace amx {
using namespace AscendC;

constexpr int64_t kTN = 16;          // weight columns (output features) per B tile
constexpr int64_t kTK = 32;          // bf16 K elements per tile row (64 bytes)
constexpr int64_t kTileElems = 512;  // bf16 elements per packed B tile (1 KiB)
constexpr int64_t kTM = 16;          // rows per A / C tile
constexpr int64_t kRowSlack = 2 * kTM;  // readable rows past the last real one (a partial A block reads them)

#if defined(OMNI_HAVE_AMX_TILES)
constexpr bool kHaveTiles = true;

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Per thread (tile state is per thread): call before the first tile instruction of a block.
inline void LoadConfig() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = kTM;
  }
  _tile_loadconfig(&c);
}
// Frees the 8 KiB of tile state so a context switch does not save it.
inline void Release() { _tile_release(); }

#ifndef OMNI_AMX_PREFETCH
#define OMNI_AMX_PREFETCH 4
#endif
constexpr int64_t kPrefetchTiles = OMNI_AMX_PREFETCH;

// C[32][32] fp32 (row stride 32) (+)= rows 0-15 (and 16-31 when kRows2) of A times B column blocks b0 (C
// columns 0-15) and b1 (16-31) over K tiles [kb0, kb1). A: bf16 rows `lda` elements apart, K zero-padded to
// whole tiles; b0/b1: contiguous packed tiles. `first`: start from zero instead of loading C.
template <bool kRows2>
OMNI_INLINE void TileDot(const uint16_t* a, int64_t lda, const uint16_t* b0, const uint16_t* b1, int64_t kb0,
                         int64_t kb1, float* c, bool first) {
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    if (kRows2) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, c, 128);
    _tile_loadd(1, c + 16, 128);
    if (kRows2) {
      _tile_loadd(2, c + 16 * 32, 128);
      _tile_loadd(3, c + 16 * 32 + 16, 128);
    }
  }
  const int64_t sa = lda * 2;
  const uint16_t* a1 = a + kTM * lda;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    if (kPrefetchTiles > 0 && kb + kPrefetchTiles < kb1) {
      // Weights stream from memory once (decode): a tile load stalls on its 16 lines, so ask for the tiles a
      // few steps ahead. 16 lines per tile and stream.
      const char* p0 = reinterpret_cast<const char*>(b0 + (kb + kPrefetchTiles) * kTileElems);
      const char* p1 = reinterpret_cast<const char*>(b1 + (kb + kPrefetchTiles) * kTileElems);
      for (int l = 0; l < 1024; l += 64) {
        _mm_prefetch(p0 + l, _MM_HINT_T0);
        _mm_prefetch(p1 + l, _MM_HINT_T0);
      }
    }
    _tile_loadd(6, b0 + kb * kTileElems, 64);
    _tile_loadd(7, b1 + kb * kTileElems, 64);
    _tile_loadd(4, a + kb * kTK, sa);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (kRows2) {
      _tile_loadd(5, a1 + kb * kTK, sa);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  if (kRows2) {
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}

constexpr int64_t kMaxRowBlocks = 8;  // 32-row blocks per TileRows call (callers' chunks are <= 256 rows)
// K tiles per pass when several row blocks share the B tiles: 2 x 8 KiB of B then stay in L1 while every row
// block passes over them (C is stored and reloaded between passes, 8 KiB per block), instead of re-reading
// B from L2 for each block; with A also from L2 the 2x2 tile kernel would be L2-bandwidth bound.
constexpr int64_t kKPass = 8;

// C[rb][32][32] for the 32-row blocks rb of `rows` (1..256) rows of A against b0/b1 over kb_n K tiles.
OMNI_INLINE void TileRows(const uint16_t* a, int64_t lda, int64_t rows, const uint16_t* b0, const uint16_t* b1,
                          int64_t kb_n, float* c) {
  const int64_t nrb = (rows + 31) / 32;
  const int64_t pass = nrb == 1 ? kb_n : kKPass;
  for (int64_t k0 = 0; k0 < kb_n; k0 += pass) {
    const int64_t k1 = k0 + pass < kb_n ? k0 + pass : kb_n;
    for (int64_t rb = 0; rb < nrb; ++rb) {
      const uint16_t* ar = a + rb * 32 * lda;
      if (rows - rb * 32 > kTM) {
        TileDot<true>(ar, lda, b0, b1, k0, k1, c + rb * 1024, k0 == 0);
      } else {
        TileDot<false>(ar, lda, b0, b1, k0, k1, c + rb * 1024, k0 == 0);
      }
    }
  }
}

// exp of 16 floats: VecExpF's range reduction and polynomial on zmm registers (the amx library has AVX-512).
OMNI_INLINE __m512 Exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// dst[0:n] = bf16(silu(g[i]) * u[i]), n <= 16: the SwiGLU epilogue of a gate/up tile row, in registers (a
// scalar loop with the bf16 rounding costs more than the tile products at prefill).
OMNI_INLINE void SiluMulBf16(const float* g, const float* u, int64_t n, uint16_t* dst) {
  const __mmask16 m = n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
  const __m512 gv = _mm512_maskz_loadu_ps(m, g), uv = _mm512_maskz_loadu_ps(m, u);
  const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), Exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
  const __m512 y = _mm512_mul_ps(_mm512_div_ps(gv, den), uv);
  _mm256_mask_storeu_epi16(dst, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(y)));
}
#else
constexpr bool kHaveTiles = false;
#endif

// Stage rows of a bf16 matrix into a tile-readable buffer: dst row r = src row idx(r) (n elements), zero
// padded to np; rows [rows, rows + kRowSlack) are zeroed too (partial A blocks read them).
template <typename RowFn>
inline void StageRows(uint16_t* dst, int64_t rows, int64_t n, int64_t np, RowFn src_row, const OmniRuntime* rt) {
  auto body = [&]() {
    int64_t r0, r1;
    BlockRange(rows + kRowSlack, GetBlockIdx(), GetBlockNum(), &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) {
      uint16_t* d = dst + r * np;
      if (r < rows) {
        CopyBytes(d, src_row(r), n * 2);
        std::memset(d + n, 0, static_cast<size_t>(np - n) * 2);
      } else {
        std::memset(d, 0, static_cast<size_t>(np) * 2);
      }
    }
  };
  LaunchBlocks(BlocksFor(rows + kRowSlack, 4 * np, rt), rt, body);
}

// Dynamic item loop with the tile configuration loaded once per block and released at its end.
template <typename ItemFn>
inline void RunTileItems(int64_t items, int64_t bytes_per_item, const OmniRuntime* rt, ItemFn& item_fn) {
#if defined(OMNI_HAVE_AMX_TILES)
  if (items <= 0) return;
  std::atomic<int64_t> next{0};
  auto body = [&]() {
    LoadConfig();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < items;
         i = next.fetch_add(1, std::memory_order_relaxed))
      item_fn(i);
    Release();
  };
  LaunchBlocks(BlocksFor(items, bytes_per_item, rt), rt, body);
#else
  (void)items, (void)bytes_per_item, (void)rt, (void)item_fn;
#endif
}

}  // namespace amx
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
