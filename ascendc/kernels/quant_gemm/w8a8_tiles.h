// W8A8 GEMM on AMX-INT8 tiles (tdpbssd; vpdpbusd in the avx512 library, see vnni_tiles.h), weights prepacked (OMNI_W_TILES_I8, omni/ops/quant_gemm.h):
// out[m, n] = float(sum_k x[m, k] * w[n, k]) * x_scale[m] * w_scale[n] + bias[n] (or the raw int32 sum), the
// row-major kernel's arithmetic: the int32 sum is exact, so the result is bit-identical to it.
//
// The activation codes are staged once, blocked (16-row blocks of contiguous 1 KiB K tiles, zero-padded), so
// A tile loads are contiguous; work items are (chunk of up to 256 rows, pair of 16-column blocks) as in the bf16
// tile GEMM (kernels/moe/amx_tiles.h): an item streams its weight tiles once and reuses them from L1 for every
// 32-row block of its chunk.
#pragma once
#include <algorithm>
#include <atomic>

#include "host/kernel_operator.h"
#include "host/simd.h"
#include "kernels/moe/amx_tiles.h"
#include "kernels/quant_gemm/w8a8_gemm.h"
#include "omni/ops/quant_gemm.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace w8a8_tiles {
using namespace AscendC;

constexpr int64_t kTK8 = 64;  // int8 K elements per tile row
constexpr int64_t kChunkRows = 32 * amx::kMaxRowBlocks;

inline int64_t Workspace(const OmniW8A8Args& a) { return AlignUp(a.M, 16) * AlignUp(a.K, kTK8); }

#if defined(OMNI_HAVE_TILE_LAYOUT)
// x [M, K] int8 (row stride x_stride) -> blocked [ceil(M/16)][kb_n][16][64], zero-padded; as x + 128 (unsigned)
// for the VNNI products (amx::kI8Unsigned; the padding's weights are 0, so its value does not matter).
inline void StageI8(int8_t* dst, const OmniW8A8Args& a, const OmniRuntime* rt) {
  const int64_t kb_n = CeilDiv(a.K, kTK8), blocks = CeilDiv(a.M, 16);
  const int64_t tail = a.K - (kb_n - 1) * kTK8;
  const __mmask64 tail_mask = tail >= 64 ? ~__mmask64{0} : ((__mmask64{1} << tail) - 1);
  const __m512i flip = _mm512_set1_epi8(amx::kI8Unsigned ? static_cast<char>(0x80) : 0);
  auto body = [&]() {
    int64_t b0, b1;
    BlockRange(blocks, GetBlockIdx(), GetBlockNum(), &b0, &b1);
    for (int64_t b = b0; b < b1; ++b) {
      int8_t* blk = dst + b * kb_n * 1024;
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t m = b * 16 + i;
        int8_t* d = blk + i * 64;
        if (m >= a.M) {
          for (int64_t kb = 0; kb < kb_n; ++kb) _mm512_store_si512(d + kb * 1024, _mm512_setzero_si512());
          continue;
        }
        const int8_t* s = a.x + m * a.x_stride;
        for (int64_t kb = 0; kb + 1 < kb_n; ++kb)
          _mm512_store_si512(d + kb * 1024, _mm512_xor_si512(_mm512_loadu_si512(s + kb * 64), flip));
        _mm512_store_si512(d + (kb_n - 1) * 1024,
                           _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, s + (kb_n - 1) * 64), flip));
      }
    }
  };
  LaunchBlocks(BlocksFor(blocks, 16 * kb_n * 64, rt), rt, body);
}

template <typename T>
void Run(const OmniW8A8Args& a, const OmniRuntime* rt) {
  int8_t* xs = static_cast<int8_t*>(a.workspace);
  StageI8(xs, a, rt);
  const int64_t kb_n = CeilDiv(a.K, kTK8), nb = CeilDiv(a.N, 16), pairs = CeilDiv(nb, 2);
  const int64_t chunks = CeilDiv(a.M, kChunkRows);
  const int8_t* w = a.w;
  auto item = [&](int64_t it) {
    const int64_t chunk = it / pairs, col = it % pairs;  // column pairs of a chunk adjacent: A shared in cache
    const int64_t m0 = chunk * kChunkRows, mrows = std::min<int64_t>(kChunkRows, a.M - m0);
    const int8_t* b0 = w + (2 * col) * kb_n * 1024;
    const int8_t* b1 = 2 * col + 1 < nb ? b0 + kb_n * 1024 : b0;
    alignas(64) int32_t C[kChunkRows * 32];
    amx::TileRows<true>(reinterpret_cast<const uint16_t*>(xs + (m0 / 16) * kb_n * 1024), kb_n, mrows,
                        reinterpret_cast<const uint16_t*>(b0), reinterpret_cast<const uint16_t*>(b1),
                        reinterpret_cast<float*>(C));
    const int64_t n0 = 2 * col * 16, nn = std::min<int64_t>(32, a.N - n0);
    for (int64_t i = 0; i < mrows; ++i) {
      const int32_t* c = C + i * 32;
      const int64_t m = m0 + i;
      if (nn < 32 || a.out_dtype == OMNI_QGEMM_OUT_I32) {
        W8A8StoreRow<T>(a, c, m, n0, nn);
        continue;
      }
      // Full column pairs in registers: (c * xs) * ws [+ bias], rounded once, as W8A8StoreRow does.
      T* o = static_cast<T*>(a.out) + m * a.out_stride + n0;
      const __m512 vx = _mm512_set1_ps(a.x_scale[m]);
      const float* ws = a.w_scale + n0;
      const T* bias = a.bias ? static_cast<const T*>(a.bias) + n0 : nullptr;
      for (int64_t j = 0; j < 32; j += 16) {
        simd::V16 y{_mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + j)), vx),
                                  _mm512_loadu_ps(ws + j))};
        if (bias) y = simd::Add(y, simd::LoadW(bias + j));
        simd::Store(o + j, y);
      }
    }
  };
  amx::RunTileItems(chunks * pairs, 2 * kb_n * 1024, rt, item);
}

inline void w8a8_gemm_tiles(const OmniW8A8Args* a, const OmniRuntime* rt) {
  if (a->M <= 0 || a->N <= 0) return;
  // OMNI_QGEMM_OUT_I32 runs the float32 instance (its epilogue stores the raw sums).
  OMNI_DISPATCH_FLOAT(a->out_dtype == OMNI_QGEMM_OUT_I32 ? OMNI_F32 : a->out_dtype, T, Run<T>(*a, rt));
}
#endif

}  // namespace w8a8_tiles
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
