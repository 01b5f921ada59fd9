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

// C[32][32] fp32 (row stride 32): rows 0-15 (and 16-31 when kRows2) of A times B column blocks b0 (C columns
// 0-15) and b1 (16-31). A: bf16 rows `lda` elements apart with kb_n * 32 readable, zero-padded elements;
// b0/b1: kb_n contiguous packed tiles.
template <bool kRows2>
OMNI_INLINE void TileDot(const uint16_t* a, int64_t lda, const uint16_t* b0, const uint16_t* b1, int64_t kb_n,
                         float* c) {
  _tile_zero(0);
  _tile_zero(1);
  if (kRows2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t sa = lda * 2;
  const uint16_t* a1 = a + kTM * lda;
  for (int64_t kb = 0; kb < kb_n; ++kb) {
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

// `rows` (1..32) rows of A against b0/b1: the two-row-block product only when the second block has real rows.
OMNI_INLINE void TileBlock(const uint16_t* a, int64_t lda, int64_t rows, const uint16_t* b0, const uint16_t* b1,
                           int64_t kb_n, float* c) {
  if (rows > kTM) {
    TileDot<true>(a, lda, b0, b1, kb_n, c);
  } else {
    TileDot<false>(a, lda, b0, b1, kb_n, c);
  }
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
