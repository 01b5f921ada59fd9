// bf16 fused MoE and grouped GEMM on AMX tiles, weights prepacked (OMNI_W_TILES_BF16, see omni/ops/moe.h).
//
// Same steps and numerics as the row-major kernels (fused_moe.h, moe_ops.h): fp32 accumulation, the SwiGLU
// activation rounded once to bf16, the down projection kept in fp32 until the weighted combine rounds once.
// What differs is the operand staging the tiles need: the tokens are gathered once in expert order and the
// activations written, both blocked (amx_tiles.h: every expert's rows start a 16-row block, K zero-padded to
// whole tiles since the padded weight columns are 0 and 0 * NaN would not be).
// Work items are (expert, chunk of up to kChunk rows, column block pair): the item streams its weight tiles
// once from memory and reuses them for each 32-row block of the chunk. At decode (a few rows per expert) that
// is one pass over each hit expert's weights, so the kernel runs at memory bandwidth; at prefill the tiles do
// 16x16x32 MACs per instruction.
#pragma once
#include <algorithm>

#include "host/simd.h"
#include "kernels/moe/amx_tiles.h"
#include "kernels/moe/expert_gemm.h"
#include "kernels/moe/fused_moe.h"
#include "omni/ops/moe.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace moe {

#if defined(OMNI_HAVE_TILE_LAYOUT)
constexpr int64_t kChunk = 32 * amx::kMaxRowBlocks;  // rows per item: one weight pass per 256 rows of an expert

// Work item `it` (ItemPrefix with kChunk rows per item and `cols` column-block pairs): expert e, its rows [r0, r0 +
// mrows) (staged from padded row prow0 on) and column-block pair `col`. All column pairs of a chunk are adjacent
// items: they share A in cache.
struct ChunkItem {
  int64_t e, r0, prow0, mrows, col;
};
OMNI_INLINE ChunkItem SplitItem(const ItemMap& map, const int64_t* offsets, const int64_t* padded, int64_t it,
                                int64_t cols) {
  const int64_t e = map.Expert(it);
  const int64_t local = it - map.item_prefix[e];
  const int64_t off = (local / cols) * kChunk;
  return {e, offsets[e] + off, padded[e] + off, std::min<int64_t>(kChunk, offsets[e + 1] - offsets[e] - off),
          local % cols};
}

// C[c.mrows][32] = the item's rows of the blocked A (kb_n K tiles) times the column blocks 2 c.col (C columns 0-15)
// and 2 c.col + 1 (16-31; block 2 c.col again past the last of nb) of the tiled matrix w [nb][kb_n tiles].
OMNI_INLINE void PairProduct(const uint16_t* a, const uint16_t* w, int64_t nb, int64_t kb_n, const ChunkItem& c,
                             float* C) {
  const uint16_t* b0 = w + (2 * c.col) * kb_n * amx::kTileElems;
  const uint16_t* b1 = 2 * c.col + 1 < nb ? b0 + kb_n * amx::kTileElems : b0;
  amx::TileRows(a + (c.prow0 / amx::kTM) * kb_n * amx::kTileElems, kb_n, c.mrows, b0, b1, C);
}

inline void FusedMoeTilesRun(const OmniFusedMoeArgs& a, const OmniRuntime* rt) {
  const FusedMoeLayout L(a, 2);
  const FusedMoeParts<uint16_t> p(L, a.workspace);
  const int64_t E = a.num_experts, H = a.hidden_size, I = a.inter_size;
  const int64_t nbi = CeilDiv(I, amx::kTN), nbh = CeilDiv(H, amx::kTN);
  const int64_t kbh = L.xs_ld / amx::kTK, kbi = L.act_ld / amx::kTK;
  const int64_t pairs_h = CeilDiv(nbh, 2);

  RouteSort(a, p.offsets, p.pair_row, p.row_token, p.items1);
  const int64_t prows = amx::PadOffsets(p.offsets, E, p.padded);
  ItemPrefix(p.offsets, E, kChunk, nbi, p.items1);
  ItemPrefix(p.offsets, E, kChunk, pairs_h, p.items2);
  const uint16_t* x = static_cast<const uint16_t*>(a.hidden);
  amx::StageBlocked(p.xs, p.offsets, p.padded, E, H, [&](int64_t r) { return x + p.row_token[r] * a.hidden_stride; },
                    rt);
  // The activations' K padding must be 0 (the last K tile of every block). Padding rows may hold anything:
  // a tile row of C depends only on its own A row, and those C rows are dropped.
  if (L.act_ld != I) {
    for (int64_t b = 0; b < prows / amx::kTM; ++b)
      std::memset(p.act + (b * kbi + kbi - 1) * amx::kTileElems, 0, amx::kTileElems * 2);
  }
  const uint16_t* w13 = static_cast<const uint16_t*>(a.w13);
  const uint16_t* w2 = static_cast<const uint16_t*>(a.w2);

  // ---- gate/up: B tiles = gate block nb and up block nb of expert e; epilogue silu(g) * u -> bf16 act ----
  {
    const ItemMap map{p.items1, E};
    const int64_t mat = nbi * kbh * amx::kTileElems;  // one [I, H] matrix
    auto item = [&](int64_t it) {
      const ChunkItem c = SplitItem(map, p.offsets, p.padded, it, nbi);
      const uint16_t* g = w13 + (2 * c.e) * mat + c.col * kbh * amx::kTileElems;
      const uint16_t* u = g + mat;
      alignas(64) float C[kChunk * 32];
      const int64_t i0 = c.col * amx::kTN, ni = std::min<int64_t>(amx::kTN, I - i0);
      amx::TileRows(p.xs + (c.prow0 / amx::kTM) * kbh * amx::kTileElems, kbh, c.mrows, g, u, C);
      for (int64_t m = 0; m < c.mrows; ++m)
        amx::SiluMulBf16(C + m * 32, C + m * 32 + 16, ni, p.act + amx::BlockedAt(c.prow0 + m, i0, kbi));
    };
    amx::RunTileItems(p.items1[E], 2 * kbh * 1024, rt, item);
  }

  // ---- down: B tiles = output column blocks 2p, 2p + 1 of W2[e]; fp32 into ybuf (unpadded rows) ----
  {
    const ItemMap map{p.items2, E};
    const int64_t mat = nbh * kbi * amx::kTileElems;
    auto item = [&](int64_t it) {
      const ChunkItem c = SplitItem(map, p.offsets, p.padded, it, pairs_h);
      alignas(64) float C[kChunk * 32];
      PairProduct(p.act, w2 + c.e * mat, nbh, kbi, c, C);
      const int64_t h0 = 2 * c.col * amx::kTN, nh = std::min<int64_t>(2 * amx::kTN, H - h0);
      amx::StoreRows(p.ybuf + c.r0 * H + h0, H, C, c.mrows, nh);
    };
    amx::RunTileItems(p.items2[E], 2 * kbi * 1024, rt, item);
  }

  CombinePairs<bfloat16_t>(a, p.pair_row, p.ybuf, rt);
}

// grouped_gemm on tiled weights: out[r] = bf16(x[r] . W[e]^T), rows of no expert zero.
// Workspace: padded offsets [E + 1], item prefix [E + 1], blocked x.
inline int64_t GroupedGemmTilesWorkspace(const OmniGroupedGemmArgs& a) {
  const int64_t E = a.num_experts;
  return 2 * AlignUp((E + 1) * 8, 64) + amx::PaddedRowsBound(a.rows, E) * AlignUp(a.k_dim, 32) * 2;
}

inline void GroupedGemmTilesRun(const OmniGroupedGemmArgs& a, const OmniRuntime* rt) {
  const int64_t E = a.num_experts, N = a.n_dim, K = a.k_dim;
  const int64_t* off = a.expert_offsets;
  uint16_t* out = static_cast<uint16_t*>(a.out);
  for (int64_t r = 0; r < off[0]; ++r) std::memset(out + r * a.out_stride, 0, static_cast<size_t>(N) * 2);
  for (int64_t r = off[E]; r < a.rows; ++r) std::memset(out + r * a.out_stride, 0, static_cast<size_t>(N) * 2);
  unsigned char* ws = static_cast<unsigned char*>(a.workspace);
  int64_t* padded = reinterpret_cast<int64_t*>(ws);
  int64_t* prefix = reinterpret_cast<int64_t*>(ws + AlignUp((E + 1) * 8, 64));
  uint16_t* xs = reinterpret_cast<uint16_t*>(ws + 2 * AlignUp((E + 1) * 8, 64));
  const int64_t kb_n = CeilDiv(K, amx::kTK), nb = CeilDiv(N, amx::kTN), pairs = CeilDiv(nb, 2);
  amx::PadOffsets(off, E, padded);  // padded[e] counts from off[0]: rows before it belong to no expert
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  amx::StageBlocked(xs, off, padded, E, K, [&](int64_t r) { return x + r * a.x_stride; }, rt);
  ItemPrefix(off, E, kChunk, pairs, prefix);
  const uint16_t* w = static_cast<const uint16_t*>(a.w);
  const int64_t mat = nb * kb_n * amx::kTileElems;
  const ItemMap map{prefix, E};
  auto item = [&](int64_t it) {
    const ChunkItem c = SplitItem(map, off, padded, it, pairs);
    alignas(64) float C[kChunk * 32];
    PairProduct(xs, w + c.e * mat, nb, kb_n, c, C);
    const int64_t n0 = 2 * c.col * amx::kTN, nn = std::min<int64_t>(2 * amx::kTN, N - n0);
    for (int64_t m = 0; m < c.mrows; ++m) {
      bfloat16_t* o = reinterpret_cast<bfloat16_t*>(out + (c.r0 + m) * a.out_stride + n0);
      if (nn == 32) {  // vcvtneps2bf16: the scalar rounding loop cost more than the tile products
        simd::Store(o, simd::LoadW(C + m * 32));
        simd::Store(o + 16, simd::LoadW(C + m * 32 + 16));
        continue;
      }
      for (int64_t n = 0; n < nn; ++n) o[n] = FromFloat<bfloat16_t>(C[m * 32 + n]);
    }
  };
  amx::RunTileItems(prefix[E], 2 * kb_n * 1024, rt, item);
}
#endif

}  // namespace moe
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
