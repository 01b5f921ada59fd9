// fp32 expert GEMM on weights prepacked into column panels (OMNI_W_PANELS_F32, see omni/ops/moe.h): the
// outer-product form of the tile C[mb, 32] = A[mb, K] . W[32, K]^T that expert_gemm.h computes as dot products.
//
// A panel holds 32 weight rows transposed, [K][32]: one K step is two zmm loads of weights and, per token row,
// one broadcast A element times both. The accumulators are C itself (kPR rows x 2 zmm), so there is no
// horizontal reduction (the dot form folds 16 accumulators per 4 x 4 block). K runs in chunks whose panel slice
// stays in L1 while every row group of the item passes over it; PanelKernel says how a chunk is read.
//
// Only the AVX-512 libraries (avx512, amx) compile it; elsewhere the binding never passes panels (the
// library's weight_layouts bit tells it).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/moe/amx_tiles.h"
#include "kernels/moe/expert_gemm.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace moe {

#if defined(OMNI_HAVE_TILE_LAYOUT)
constexpr bool kHavePanels = true;
constexpr int64_t kPanelN = 32;   // weight rows (output columns) per panel
constexpr int kPR = 8;            // token rows per micro-kernel: 16 zmm accumulators
constexpr int64_t kPanelKC = 128;  // K per chunk: 16 KiB of panel + 48 rows x 512 B of A fit L1 together
static_assert(kMB % kPR == 0 && kNT == kPanelN, "panel tile sizes");

// C[r][0:32] += sum_k a[r][k] * P[k][0:32] for r < MR, k < kc; C row stride kPanelN. The chunk is read as
// kStreams interleaved streams (its quarters, 4 KiB apart): one sequential stream per core reached ~11 GB/s
// from memory on Intel SPR, four ~16 GB/s (the hardware prefetcher runs a bounded depth per stream), and at
// decode every panel line comes from memory once. With kPrefetch the same span of the next chunk (pf) is
// pulled into L2 along the way: the second row group runs from L1, so the first group of the next chunk need
// not wait on memory.
constexpr int kStreams = 4;
template <int MR, bool kPrefetch = false>
OMNI_INLINE void PanelKernel(const float* const* a, const float* OMNI_RESTRICT P, int64_t kc, float* OMNI_RESTRICT C,
                             const float* pf = nullptr) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = _mm512_loadu_ps(C + r * kPanelN);
    acc[r][1] = _mm512_loadu_ps(C + r * kPanelN + 16);
  }
  auto step = [&](int64_t k) {
    if constexpr (kPrefetch) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * kPanelN), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * kPanelN + 16), _MM_HINT_T1);
    }
    const __m512 w0 = _mm512_loadu_ps(P + k * kPanelN), w1 = _mm512_loadu_ps(P + k * kPanelN + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(a[r][k]);  // folds into the FMAs as {1to16} broadcasts
      acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
    }
  };
  const int64_t q = kc / kStreams;
  for (int64_t k = 0; k < q; ++k)
    for (int s = 0; s < kStreams; ++s) step(s * q + k);
  for (int64_t k = kStreams * q; k < kc; ++k) step(k);
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(C + r * kPanelN, acc[r][0]);
    _mm512_storeu_ps(C + r * kPanelN + 16, acc[r][1]);
  }
}

// One group of `rows` (<= MR) token rows; pf: the next chunk to prefetch, or null.
template <int MR>
OMNI_INLINE void PanelRows(int rows, const float* const* a, const float* P, int64_t kc, float* C, const float* pf) {
  if constexpr (MR > 0) {
    if (rows != MR) {
      PanelRows<MR - 1>(rows, a, P, kc, C, pf);
    } else if (pf != nullptr) {
      PanelKernel<MR, true>(a, P, kc, C, pf);
    } else {
      PanelKernel<MR>(a, P, kc, C);
    }
  }
}

// C[mb, 32] (row stride 32, overwritten) = rows a_rows[0..mb) (fp32, K each, mb <= kMB) times the panel
// [K][32].
OMNI_INLINE void PanelProduct(const float* const* a_rows, int64_t mb, const float* panel, int64_t K, float* C) {
  std::memset(C, 0, static_cast<size_t>(mb * kPanelN) * sizeof(float));
  const float* a[kMB];
  for (int64_t k0 = 0; k0 < K; k0 += kPanelKC) {
    const int64_t kc = K - k0 < kPanelKC ? K - k0 : kPanelKC;
    for (int64_t m = 0; m < mb; ++m) a[m] = a_rows[m] + k0;
    const float* P = panel + k0 * kPanelN;
    // The first row group streams the chunk from memory, the second (full or not) prefetches the next one.
    const float* next = k0 + kc < K ? P + kc * kPanelN : nullptr;
    for (int64_t m0 = 0; m0 < mb; m0 += kPR)
      PanelRows<kPR>(static_cast<int>(std::min<int64_t>(kPR, mb - m0)), a + m0, P, kc, C + m0 * kPanelN,
                     m0 == kPR ? next : nullptr);
  }
}
#else
constexpr bool kHavePanels = false;
#endif

// The item's C tile [it.mb, 32] into C (row stride 32) for the rows a_row(r), from its panel in `panels`
// (`tiles` panels of K rows per expert): fp32 on an AVX-512 library; never called otherwise (the bindings pass
// panels only there). Returns C.
template <typename T, typename ARowFn>
OMNI_INLINE const float* PanelItem(const RowItem& it, ARowFn a_row, const T* panels, int64_t tiles, int64_t K,
                                   float* C) {
  if constexpr (std::is_same_v<T, float> && kHavePanels) {
    const float* a_rows[kMB];
    for (int64_t m = 0; m < it.mb; ++m) a_rows[m] = a_row(it.r0 + m);
    PanelProduct(a_rows, it.mb, panels + (it.e * tiles + it.tile) * K * kNT, K, C);
  } else {
    (void)it, (void)a_row, (void)panels, (void)tiles, (void)K;
  }
  return C;
}

}  // namespace moe
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
