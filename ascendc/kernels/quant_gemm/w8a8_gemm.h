// W8A8 GEMM, Ascend C style: out[m, n] = float(sum_k x[m,k] * w[n,k]) * x_scale[m] * w_scale[n] + bias[n]
// (or the raw int32 sum). The sum is exact in int32 (K <= 131071 is checked by the bindings).
//
// Tiling: the output is cut into (MB x NB) tiles, blocks (= cores) own contiguous runs of tiles ordered
// m-tile-major, so a block keeps its A tile in the UB across consecutive n-tiles. Per tile and K chunk:
//   CopyIn:  x rows [MB, KC] int8 -> int16 in the UB (only when the m-tile or K chunk changes);
//   Compute: for each pair of weight rows (read from GM, L1-resident for the pass) and each 4 rows of A, the
//            cube's DotI8<4, 2> adds into an int32 accumulator tile [MB, NB] in the UB;
//   CopyOut: the epilogue scales, adds bias and rounds once to the output dtype.
#pragma once
#include "host/kernel_operator.h"
#include "host/simd.h"
#include "kernels/quant_gemm/cube.h"
#include "omni/ops/quant_gemm.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
using namespace AscendC;

struct W8A8Tiling {
  static constexpr int64_t kNB = 64;                 // weight rows per tile
  static constexpr int64_t kMR = 4, kNR = 2;         // cube tile
  // A tile [mb, kc] int16 in the UB: 64 KiB with K chunks of 1024 keeps it near L1 while every weight row
  // pair streams past it (measured 1.3-1.4x at M = 256 over one 128 KiB tile spanning up to 8192 of K).
  static constexpr int64_t kABytes = 64 * 1024;
  int64_t kc, mb, mt, nt;
  explicit W8A8Tiling(const OmniW8A8Args& a) {
    kc = a.K < 1024 ? a.K : 1024;
    int64_t rows = kABytes / (2 * kc);
    rows = rows >= 64 ? 64 : (rows >= 4 ? rows / 4 * 4 : rows);
    mb = rows < a.M ? rows : a.M;
    mt = CeilDiv(a.M, mb);
    nt = CeilDiv(a.N, kNB);
  }
};

// The epilogue of output row m, columns [n0, n0 + n), from their int32 sums c: the raw sums (OMNI_QGEMM_OUT_I32) or
// c * x_scale[m] * w_scale[n] [+ bias[n]] rounded once to T. Also the tile kernel's (w8a8_tiles.h).
template <typename T>
OMNI_INLINE void W8A8StoreRow(const OmniW8A8Args& a, const int32_t* c, int64_t m, int64_t n0, int64_t n) {
  if (a.out_dtype == OMNI_QGEMM_OUT_I32) {
    int32_t* o = static_cast<int32_t*>(a.out) + m * a.out_stride + n0;
    for (int64_t j = 0; j < n; ++j) o[j] = c[j];
    return;
  }
  T* o = static_cast<T*>(a.out) + m * a.out_stride + n0;
  const float xs = a.x_scale[m];
  const float* ws = a.w_scale + n0;
  const T* bias = a.bias ? static_cast<const T*>(a.bias) + n0 : nullptr;
  for (int64_t j = 0; j < n; ++j) {
    float y = static_cast<float>(c[j]) * xs * ws[j];
    if (bias) y += ToFloat(bias[j]);
    o[j] = FromFloat<T>(y);
  }
}

template <typename T>
class KernelW8A8 {
 public:
  KernelW8A8(const OmniW8A8Args& a, const W8A8Tiling& t) : a_(a), t_(t) {
    pipe_.InitBuffer(abuf_, static_cast<uint32_t>(t.mb * t.kc * sizeof(int16_t)));
    pipe_.InitBuffer(accbuf_, static_cast<uint32_t>(t.mb * W8A8Tiling::kNB * sizeof(int32_t)));
  }

  void Process() {
    int64_t begin, end;
    BlockRange(t_.mt * t_.nt, GetBlockIdx(), GetBlockNum(), &begin, &end);
    for (int64_t tile = begin; tile < end; ++tile) Tile(tile / t_.nt, tile % t_.nt);
  }

 private:
  void LoadA(int64_t m0, int64_t mb, int64_t k0, int64_t kc) {
    if (m0 == cached_m0_ && k0 == cached_k0_) return;
    int16_t* dst = abuf_.Get<int16_t>().GetPhyAddr();
    for (int64_t i = 0; i < mb; ++i) {
      const int8_t* src = a_.x + (m0 + i) * a_.x_stride + k0;
      int16_t* d = dst + i * t_.kc;
      for (int64_t k = 0; k < kc; ++k) d[k] = src[k];
    }
    cached_m0_ = m0;
    cached_k0_ = k0;
  }

  template <int MR, int NR>
  OMNI_INLINE void Cube(const int16_t* A, const int8_t* W, int64_t kc, int32_t* acc, bool first) {
    int32_t r[MR][NR];
    cube::DotI8<MR, NR>(A, t_.kc, W, a_.w_stride, kc, r);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i * W8A8Tiling::kNB + j] = first ? r[i][j] : acc[i * W8A8Tiling::kNB + j] + r[i][j];
  }

  template <int NR>
  OMNI_INLINE void CubeRows(int64_t mr, const int16_t* A, const int8_t* W, int64_t kc, int32_t* acc, bool first) {
    switch (mr) {
      case 4: return Cube<4, NR>(A, W, kc, acc, first);
      case 3: return Cube<3, NR>(A, W, kc, acc, first);
      case 2: return Cube<2, NR>(A, W, kc, acc, first);
      default: return Cube<1, NR>(A, W, kc, acc, first);
    }
  }

  void Tile(int64_t mi, int64_t ni) {
    const int64_t m0 = mi * t_.mb, mb = a_.M - m0 < t_.mb ? a_.M - m0 : t_.mb;
    const int64_t n0 = ni * W8A8Tiling::kNB, nb = a_.N - n0 < W8A8Tiling::kNB ? a_.N - n0 : W8A8Tiling::kNB;
    int32_t* acc = accbuf_.Get<int32_t>().GetPhyAddr();
    const int16_t* A = abuf_.Get<int16_t>().GetPhyAddr();
    for (int64_t k0 = 0; k0 < a_.K; k0 += t_.kc) {
      const int64_t kc = a_.K - k0 < t_.kc ? a_.K - k0 : t_.kc;
      LoadA(m0, mb, k0, kc);
      const bool first = k0 == 0;
      for (int64_t j = 0; j < nb; j += W8A8Tiling::kNR) {
        const int8_t* W = a_.w + (n0 + j) * a_.w_stride + k0;
        const int64_t nr = nb - j < W8A8Tiling::kNR ? nb - j : W8A8Tiling::kNR;
        for (int64_t i = 0; i < mb; i += W8A8Tiling::kMR) {
          const int64_t mr = mb - i < W8A8Tiling::kMR ? mb - i : W8A8Tiling::kMR;
          int32_t* c = acc + i * W8A8Tiling::kNB + j;
          if (nr == 2) {
            CubeRows<2>(mr, A + i * t_.kc, W, kc, c, first);
          } else {
            CubeRows<1>(mr, A + i * t_.kc, W, kc, c, first);
          }
        }
      }
    }
    // CopyOut with the epilogue.
    for (int64_t i = 0; i < mb; ++i) W8A8StoreRow<T>(a_, acc + i * W8A8Tiling::kNB, m0 + i, n0, nb);
  }

  const OmniW8A8Args& a_;
  const W8A8Tiling& t_;
  int64_t cached_m0_ = -1, cached_k0_ = -1;
  TPipe pipe_;
  TBuf<TPosition::A1> abuf_;
  TBuf<TPosition::CO1> accbuf_;
};

template <typename T>
void W8A8Launch(const OmniW8A8Args* a, const OmniRuntime* rt) {
  const W8A8Tiling t(*a);
  auto body = [a, &t]() {
    KernelW8A8<T> k(*a, t);
    k.Process();
  };
  // A tile's cost is ~its weight bytes (read once per tile) times its rows.
  const int64_t per_tile = W8A8Tiling::kNB * a->K * (t.mb < 8 ? 1 : t.mb / 8);
  LaunchBlocks(BlocksFor(t.mt * t.nt, per_tile, rt), rt, body);
}

inline void w8a8_gemm(const OmniW8A8Args* a, const OmniRuntime* rt) {
  if (a->M <= 0 || a->N <= 0) return;
  // OMNI_QGEMM_OUT_I32 runs the float32 instance (its epilogue stores the raw sums).
  OMNI_DISPATCH_FLOAT(a->out_dtype == OMNI_QGEMM_OUT_I32 ? OMNI_F32 : a->out_dtype, T, W8A8Launch<T>(a, rt));
}

// Dynamic per-token int8 quantization in one pass over each row (amax, then codes); the same arithmetic as
// omniops.quant.formats.quantize_activation_per_token_int8 (fp32 amax / 127, x / scale rounded half to even).
template <typename T>
void QuantI8Launch(const OmniQuantI8Args* a, const OmniRuntime* rt) {
  auto body = [a]() {
    int64_t b, e;
    BlockRange(a->M, GetBlockIdx(), GetBlockNum(), &b, &e);
    for (int64_t m = b; m < e; ++m) {
      const T* src = static_cast<const T*>(a->x) + m * a->x_stride;
      int8_t* q = a->out + m * a->K;
      float amax = 0.0f;
      int64_t k0 = 0;
#if defined(OMNI_SIMD_AVX512)
      // 16 lanes, the same arithmetic (division, not a reciprocal; RNE; the clamp), ~10x the scalar loops.
      __m512 vmax = _mm512_setzero_ps();
      for (; k0 + 16 <= a->K; k0 += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(simd::LoadW(src + k0).v));
      amax = _mm512_reduce_max_ps(vmax);
#endif
      for (int64_t k = k0; k < a->K; ++k) {
        const float v = __builtin_fabsf(ToFloat(src[k]));
        amax = v > amax ? v : amax;
      }
      const float s = amax / 127.0f;
      const float d = s == 0.0f ? 1.0f : s;
      int64_t k1 = 0;
#if defined(OMNI_SIMD_AVX512)
      const __m512 vd = _mm512_set1_ps(d), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
      for (; k1 + 16 <= a->K; k1 += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(simd::LoadW(src + k1).v, vd),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k1), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
      }
#endif
      for (int64_t k = k1; k < a->K; ++k) {
        float v = __builtin_nearbyintf(ToFloat(src[k]) / d);
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        q[k] = static_cast<int8_t>(v);
      }
      a->scale[m] = s;
    }
  };
  LaunchBlocks(BlocksFor(a->M, a->K * static_cast<int64_t>(sizeof(T) + 1), rt), rt, body);
}

inline void quantize_per_token_int8(const OmniQuantI8Args* a, const OmniRuntime* rt) {
  if (a->M <= 0 || a->K <= 0) return;
  OMNI_DISPATCH_FLOAT(a->dtype, T, QuantI8Launch<T>(a, rt));
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
