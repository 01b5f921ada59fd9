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
// Only the amx library compiles the tile code (-mamx-tile -mamx-bf16). The avx512 library computes the same
// layout with vdpbf16ps / vpdpbusd (vnni_tiles.h: its own TileRows, everything else here shared); elsewhere
// kHaveTiles is false and the binding never passes tiled weights (the library's weight_layouts bit tells it).
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>

#include "host/kernel_operator.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_ps(), which -Wmaybe-uninitialized
// reports at every use; the values are fully written.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define OMNI_HAVE_AMX_TILES 1
#endif
// The tile layouts are computed by this library: with AMX, or with AVX512-BF16 + VNNI (vnni_tiles.h).
#if defined(OMNI_HAVE_AMX_TILES) || \
    (defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__))
#define OMNI_HAVE_TILE_LAYOUT 1
#endif
#if defined(OMNI_HAVE_TILE_LAYOUT) && !defined(OMNI_HAVE_AMX_TILES)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels/moe/vnni_tiles.h"
#endif

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace amx {
using namespace AscendC;

constexpr int64_t kTN = 16;          // weight columns (output features) per B tile
constexpr int64_t kTK = 32;          // bf16 K elements per tile row (64 bytes)
constexpr int64_t kTileElems = 512;  // bf16 elements per packed B tile (1 KiB)
constexpr int64_t kTM = 16;          // rows per A / C tile
constexpr int64_t kMaxRowBlocks = 8;  // 32-row blocks per TileRows call (callers' chunks are <= 256 rows)

#if defined(OMNI_HAVE_TILE_LAYOUT)
constexpr bool kHaveTiles = true;
#else
constexpr bool kHaveTiles = false;
#endif

#if defined(OMNI_HAVE_AMX_TILES)
constexpr bool kI8Unsigned = false;  // tdpbssd takes the activation codes as they are

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
#ifndef OMNI_AMX_PREFETCH_A
#define OMNI_AMX_PREFETCH_A 0
#endif
constexpr bool kPrefetchA = OMNI_AMX_PREFETCH_A;

// Tile C += A . B: int8 (tdpbssd) when i8, else bf16 (tdpbf16ps). A macro because the tile operands are register
// numbers pasted into the instruction: they must be literal constants.
#define OMNI_TILE_DOT(i8, c, a, b) \
  do {                             \
    if constexpr (i8) {            \
      _tile_dpbssd(c, a, b);       \
    } else {                       \
      _tile_dpbf16ps(c, a, b);     \
    }                              \
  } while (0)

// C[32][32] fp32 (row stride 32) (+)= A row block 0 (and 1 when kRows2) times B column blocks b0 (C columns
// 0-15) and b1 (16-31) over K tiles [kb0, kb1). A: blocked, `a_blk` elements from one 16-row block to the next;
// b0/b1: contiguous packed tiles. `first`: start from zero instead of loading C.
// kI8: int8 operands (tdpbssd: s8 x s8 -> s32, 64 K per tile row, C holds int32), else bf16 (tdpbf16ps). Both
// use 1 KiB tiles; pointers are to 16-bit units either way (a K tile is 512 of them).
// pf_b: prefetch this pass's weights a few tiles ahead (first row block); pf_next > 0: prefetch the weights
// pf_next tiles ahead (the next pass) into L2, up to K tile kb_end.
template <bool kRows2, bool kI8 = false>
OMNI_INLINE void TileDot(const uint16_t* a, int64_t a_blk, const uint16_t* b0, const uint16_t* b1, int64_t kb0,
                         int64_t kb1, float* c, bool first, bool pf_b = true, int64_t pf_next = 0,
                         int64_t kb_end = 0) {
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
  const uint16_t* a1 = a + a_blk;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    if (kPrefetchTiles > 0 && kb + kPrefetchTiles < kb1 + pf_next) {
      // A tile load stalls on its 16 lines: ask for the tiles a few steps ahead. The weights (B) come from
      // memory only on the first row block of an item (later blocks find them in L1); A comes from L2 always.
      if (pf_b && kb + kPrefetchTiles < kb1) {
        const char* p0 = reinterpret_cast<const char*>(b0 + (kb + kPrefetchTiles) * kTileElems);
        const char* p1 = reinterpret_cast<const char*>(b1 + (kb + kPrefetchTiles) * kTileElems);
        for (int l = 0; l < 1024; l += 64) {
          _mm_prefetch(p0 + l, _MM_HINT_T0);
          _mm_prefetch(p1 + l, _MM_HINT_T0);
        }
      }
      if (pf_next > 0 && kb + pf_next < kb_end) {
        // The next K pass's weights, into L2 while this pass computes from L1: otherwise each pass's first row
        // block waits on memory (a pass consumes 32 B/cycle of weights, beyond one core's memory bandwidth).
        const char* p0 = reinterpret_cast<const char*>(b0 + (kb + pf_next) * kTileElems);
        const char* p1 = reinterpret_cast<const char*>(b1 + (kb + pf_next) * kTileElems);
        for (int l = 0; l < 1024; l += 64) {
          _mm_prefetch(p0 + l, _MM_HINT_T1);
          _mm_prefetch(p1 + l, _MM_HINT_T1);
        }
      }
      if (kPrefetchA) {
        const char* q0 = reinterpret_cast<const char*>(a + (kb + kPrefetchTiles) * kTileElems);
        const char* q1 = reinterpret_cast<const char*>(a1 + (kb + kPrefetchTiles) * kTileElems);
        for (int l = 0; l < 1024; l += 64) {
          _mm_prefetch(q0 + l, _MM_HINT_T0);
          if (kRows2) _mm_prefetch(q1 + l, _MM_HINT_T0);
        }
      }
    }
    _tile_loadd(6, b0 + kb * kTileElems, 64);
    _tile_loadd(7, b1 + kb * kTileElems, 64);
    _tile_loadd(4, a + kb * kTileElems, 64);
    OMNI_TILE_DOT(kI8, 0, 4, 6);
    OMNI_TILE_DOT(kI8, 1, 4, 7);
    if (kRows2) {
      _tile_loadd(5, a1 + kb * kTileElems, 64);
      OMNI_TILE_DOT(kI8, 2, 5, 6);
      OMNI_TILE_DOT(kI8, 3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  if (kRows2) {
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}

// K tiles per pass when several row blocks share the B tiles: 2 x 16 KiB of B then stay in L1 while every row
// block passes over them (C is stored and reloaded between passes, 8 KiB per block), instead of re-reading
// B from L2 for each block (measured 1.12 / 1.23 / 1.25 TFLOP/s with passes of 4 / 8 / 16 tiles).
constexpr int64_t kKPass = 16;

// C[rb][32][32] for the 32-row blocks rb of `rows` (1..256) blocked rows of A (starting at a 16-row block)
// against b0/b1 over kb_n K tiles.
template <bool kI8 = false>
OMNI_INLINE void TileRows(const uint16_t* a, int64_t kb_n, int64_t rows, const uint16_t* b0, const uint16_t* b1,
                          float* c) {
  const int64_t nrb = (rows + 31) / 32, a_blk = kb_n * kTileElems;
  const int64_t pass = nrb == 1 ? kb_n : kKPass;
  for (int64_t k0 = 0; k0 < kb_n; k0 += pass) {
    const int64_t k1 = k0 + pass < kb_n ? k0 + pass : kb_n;
    for (int64_t rb = 0; rb < nrb; ++rb) {
      const uint16_t* ar = a + 2 * rb * a_blk;
      if (rows - rb * 32 > kTM) {
        TileDot<true, kI8>(ar, a_blk, b0, b1, k0, k1, c + rb * 1024, k0 == 0, rb == 0, rb == 1 ? pass : 0, kb_n);
      } else {
        TileDot<false, kI8>(ar, a_blk, b0, b1, k0, k1, c + rb * 1024, k0 == 0, rb == 0, rb == 1 ? pass : 0, kb_n);
      }
    }
  }
}

#endif  // OMNI_HAVE_AMX_TILES

#if defined(OMNI_HAVE_TILE_LAYOUT)
// A operands are staged "blocked": 16-row blocks, each a run of K tiles [kb][16 rows][32 bf16], so every A tile
// load reads one contiguous 1 KiB (row stride 64 B). Rows `lda` apart in a plain matrix would put a tile's 16
// rows 4-8 KiB apart, all in the same L1 set, and thrash it at prefill.
OMNI_INLINE int64_t BlockedAt(int64_t row, int64_t k, int64_t kb_n) {
  return ((row / kTM) * kb_n + k / kTK) * kTileElems + (row % kTM) * kTK + k % kTK;
}

// Lanes i < n of 16 (n clamped to 0..16).
OMNI_INLINE __mmask16 FirstLanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
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
  const __mmask16 m = FirstLanes(n);
  const __m512 gv = _mm512_maskz_loadu_ps(m, g), uv = _mm512_maskz_loadu_ps(m, u);
  const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), Exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
  const __m512 y = _mm512_mul_ps(_mm512_div_ps(gv, den), uv);
  _mm256_mask_storeu_epi16(dst, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(y)));
}
// dst[m * ld + 0:n] = C[m * 32 + 0:n] for m < rows (n <= 32): the fp32 down-projection rows into the combine
// buffer. Full 128-byte rows at 64-byte aligned addresses go out as streaming stores: the buffer ([pairs, H]
// fp32, 33 MB at 2048 tokens top-4 x 1024) is far beyond the caches, and a plain store first reads every line
// it writes (measured: per-row memcpy was ~19 % of fused_moe at T = 2048).
OMNI_INLINE void StoreRows(float* dst, int64_t ld, const float* C, int64_t rows, int64_t n) {
  const bool stream = n == 32 && (reinterpret_cast<uintptr_t>(dst) % 64) == 0 && (ld * 4) % 64 == 0;
  if (stream) {
    for (int64_t m = 0; m < rows; ++m) {
      _mm512_stream_ps(dst + m * ld, _mm512_load_ps(C + m * 32));
      _mm512_stream_ps(dst + m * ld + 16, _mm512_load_ps(C + m * 32 + 16));
    }
    _mm_sfence();  // the combine (another launch, maybe another thread) reads these lines next
    return;
  }
  const __mmask16 m0 = FirstLanes(n), m1 = FirstLanes(n - 16);
  for (int64_t m = 0; m < rows; ++m) {
    _mm512_mask_storeu_ps(dst + m * ld, m0, _mm512_maskz_loadu_ps(m0, C + m * 32));
    _mm512_mask_storeu_ps(dst + m * ld + 16, m1, _mm512_maskz_loadu_ps(m1, C + m * 32 + 16));
  }
}

// Stage the sorted rows [offsets[e], offsets[e + 1]) of every expert, row r read from src_row(r) (k elements),
// blocked (BlockedAt) at padded row padded[e] + (r - offsets[e]); K padding and padding rows are zero. One
// masked 64-byte load + aligned store per tile row.
template <typename RowFn>
inline void StageBlocked(uint16_t* dst, const int64_t* offsets, const int64_t* padded, int64_t E, int64_t k,
                         RowFn src_row, const OmniRuntime* rt) {
  const int64_t kb_n = (k + kTK - 1) / kTK, blocks = padded[E] / kTM;
  const int64_t tail = k - (kb_n - 1) * kTK;
  const __mmask32 tail_mask = tail >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << tail) - 1);
  auto body = [&]() {
    int64_t b0, b1;
    BlockRange(blocks, GetBlockIdx(), GetBlockNum(), &b0, &b1);
    int64_t e = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t prow0 = b * kTM;
      while (padded[e + 1] <= prow0) ++e;  // the expert owning this block (blocks never straddle experts)
      uint16_t* blk = dst + b * kb_n * kTileElems;
      for (int64_t i = 0; i < kTM; ++i) {
        const int64_t r = offsets[e] + (prow0 + i - padded[e]);
        uint16_t* d = blk + i * kTK;
        if (r >= offsets[e + 1]) {
          for (int64_t kb = 0; kb < kb_n; ++kb) _mm512_store_si512(d + kb * kTileElems, _mm512_setzero_si512());
          continue;
        }
        const uint16_t* s = src_row(r);
        for (int64_t kb = 0; kb + 1 < kb_n; ++kb)
          _mm512_store_si512(d + kb * kTileElems, _mm512_loadu_si512(s + kb * kTK));
        _mm512_store_si512(d + (kb_n - 1) * kTileElems, _mm512_maskz_loadu_epi16(tail_mask, s + (kb_n - 1) * kTK));
      }
    }
  };
  LaunchBlocks(BlocksFor(blocks, kTM * kb_n * 64, rt), rt, body);
}

#endif  // OMNI_HAVE_TILE_LAYOUT

// Expert e's rows start at a 16-row block in the staged operands: padded[e] = sum over e' < e of
// AlignUp(rows(e'), 16). Returns the total padded row count (<= rows + 15 * min(E, rows)).
inline int64_t PadOffsets(const int64_t* offsets, int64_t E, int64_t* padded) {
  padded[0] = 0;
  for (int64_t e = 0; e < E; ++e) padded[e + 1] = padded[e] + AlignUp(offsets[e + 1] - offsets[e], kTM);
  return padded[E];
}
OMNI_INLINE int64_t PaddedRowsBound(int64_t rows, int64_t E) { return rows + (kTM - 1) * (E < rows ? E : rows); }

// Dynamic item loop with the tile configuration loaded once per block and released at its end.
template <typename ItemFn>
inline void RunTileItems(int64_t items, int64_t bytes_per_item, const OmniRuntime* rt, ItemFn& item_fn) {
#if defined(OMNI_HAVE_TILE_LAYOUT)
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
