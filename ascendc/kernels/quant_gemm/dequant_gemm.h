// Dequantize-in-the-UB GEMMs (W4A16 int4 group-wise, FP8 block-scaled), Ascend C style:
//   out[m, n] = sum_k xf[m, k] * wf[n, k] + bias[n],  fp32 accumulation, one rounding to the output dtype,
// where xf is x widened to fp32 (W4A16) or x_q * x_scale (FP8; the 128-group scale folds into the operand so
// the result equals "dequantize both, then multiply" up to the summation order), and wf the dequantized
// weight: (code - zero) * scale (int4) or LUT[fp8 byte] * block scale (FP8).
//
// Phase 1 (all blocks, rows split): x -> xf in the fp32 scratch `work` [M, K] (dequantized once, not per tile).
// Phase 2: tiles of (MC rows of x) x (nt rows of w). Per tile and K chunk of kc (dq::TilingFor):
//   CopyIn + dequantize: nt x kc weights into the UB as fp32 (the format-specific part);
//   Compute: cube::DotF32<4, 2> over all MC rows adds into the UB accumulator tile [MC, nt];
//   CopyOut: + bias, round to the output dtype.
// The weight tile is dequantized once per (tile, chunk) and reused by up to MC = 256 rows of x.
#pragma once
#include "host/kernel_operator.h"
#include "kernels/quant_gemm/cube.h"
#include "omni/ops/quant_gemm.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
using namespace AscendC;

namespace dq {
constexpr int64_t kMC = 256, kMR = 4, kNR = 2;

// Weight tile: nt rows x kc of K, dequantized to fp32 in the UB (<= 32 KiB, L1-sized).
struct Tiling {
  int64_t nt, kc;
};
inline Tiling TilingFor(int64_t M, int64_t K) {
  // Few rows of x: the GEMM streams weights, and full-row runs keep that stream sequential for the hardware
  // prefetchers (measured 2x at M = 1 against 16 x 512 tiles). Many rows: 16 weight rows share each pass over
  // an L2-sized [256, 512] slice of x. Both kc are multiples of every group size and of 32 (int4 permutation).
  if (M <= 32) return {2, K < 4096 ? K : 4096};
  return {16, 512};
}

using cube::Fp8Lut;

// A tile reads each weight row in runs of one K chunk (256..512 bytes) at a stride of a whole row: too short for
// the hardware prefetchers, so every cache line would cost a DRAM round trip (measured 5-8x slower at M = 1).
// Before decoding a row's chunk, ask for the same row's next chunk.
OMNI_INLINE void PrefetchNext(const uint8_t* run, int64_t bytes, int64_t left) {
  const int64_t end = 2 * bytes < left ? 2 * bytes : left;
  for (int64_t off = bytes; off < end; off += 64) __builtin_prefetch(run + off, 0, 0);
}

// Format: how to widen a row of x into fp32 and dequantize a weight tile into the UB. Every format holds its op's
// arguments `a` and gives the GEMM sizes from them.
template <typename Args>
struct FormatOf {
  const Args& a;
  int64_t K() const { return a.K; }
  int64_t M() const { return a.M; }
  int64_t N() const { return a.N; }
};

struct Int4Format : FormatOf<OmniW4A16Args> {
  // x row -> fp32 in the permuted K order of cube::Int4x32 (per 32: even k, then odd k). K % 32 == 0.
  template <typename T>
  void WidenRow(int64_t m, float* dst) const {
    const T* src = static_cast<const T*>(a.x) + m * a.x_stride;
    for (int64_t k0 = 0; k0 < a.K; k0 += 32)
      for (int64_t j = 0; j < 16; ++j) {
        dst[k0 + j] = ToFloat(src[k0 + 2 * j]);
        dst[k0 + 16 + j] = ToFloat(src[k0 + 2 * j + 1]);
      }
  }
  // dst[r * ldd + (k - k0)] = w[n0 + r, k] (permuted within each 32) for k in [k0, k0 + kc); k0, kc are
  // multiples of group_size (itself a multiple of 32).
  void DequantTile(int64_t n0, int64_t nr, int64_t k0, int64_t kc, float* dst, int64_t ldd) const {
    const int64_t G = a.group_size, ng = a.K / G;
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t n = n0 + r;
      const uint8_t* wp = a.w + n * (a.K / 2);
      PrefetchNext(wp + k0 / 2, kc / 2, a.K / 2 - k0 / 2);
      float* d = dst + r * ldd - k0;
      for (int64_t g = k0 / G; g < (k0 + kc) / G; ++g) {
        const float s = a.scales[n * ng + g];
        const float z = a.zeros ? static_cast<float>(a.zeros[n * ng + g]) : 8.0f;
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) cube::Int4x32(wp + k / 2, z, s, d + k);
      }
    }
  }
};

struct Fp8Format : FormatOf<OmniFp8BlockArgs> {
  template <typename T>
  void WidenRow(int64_t m, float* dst) const {
    const float* lut = Fp8Lut();
    const uint8_t* src = a.x + m * a.x_stride;
    const int64_t kb = CeilDiv(a.K, 128);
    const float* xs = a.x_scale + m * kb;
    int64_t k = 0;
    for (; k + 16 <= a.K; k += 16) cube::E4m3x16(src + k, xs[k >> 7], dst + k);  // 16 | 128: one scale
    for (; k < a.K; ++k) dst[k] = lut[src[k]] * xs[k >> 7];
  }
  void DequantTile(int64_t n0, int64_t nr, int64_t k0, int64_t kc, float* dst, int64_t ldd) const {
    const float* lut = Fp8Lut();
    const int64_t kb = CeilDiv(a.K, 128);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t n = n0 + r;
      const uint8_t* wp = a.w + n * a.w_stride;
      PrefetchNext(wp + k0, kc, a.K - k0);
      const float* ws = a.w_scale + (n >> 7) * kb;
      float* d = dst + r * ldd - k0;
      int64_t k = k0;
      for (; k + 16 <= k0 + kc; k += 16) cube::E4m3x16(wp + k, ws[k >> 7], d + k);
      for (; k < k0 + kc; ++k) d[k] = lut[wp[k]] * ws[k >> 7];
    }
  }
};
}  // namespace dq

template <typename T, typename Fmt>
class KernelDequantGemm {
 public:
  KernelDequantGemm(const Fmt& f, const dq::Tiling& t, const float* xf, void* out, int64_t out_stride,
                    const void* bias)
      : f_(f), t_(t), xf_(xf), out_(static_cast<T*>(out)), out_stride_(out_stride),
        bias_(static_cast<const T*>(bias)) {
    pipe_.InitBuffer(wbuf_, static_cast<uint32_t>(t.nt * t.kc * sizeof(float)));
    pipe_.InitBuffer(accbuf_, static_cast<uint32_t>(dq::kMC * t.nt * sizeof(float)));
  }

  static int64_t MTiles(const Fmt& f) { return CeilDiv(f.M(), dq::kMC); }
  static int64_t NTiles(const Fmt& f, const dq::Tiling& t) { return CeilDiv(f.N(), t.nt); }

  void Process() {
    const int64_t mt = MTiles(f_), nt = NTiles(f_, t_);
    int64_t begin, end;
    BlockRange(mt * nt, GetBlockIdx(), GetBlockNum(), &begin, &end);
    for (int64_t tile = begin; tile < end; ++tile) Tile(tile / nt, tile % nt);
  }

 private:
  template <int MR, int NR>
  OMNI_INLINE void Cube(const float* X, const float* W, int64_t kc, float* acc) {
    cube::DotF32<MR, NR>(X, f_.K(), W, t_.kc, kc, acc, t_.nt);
  }
  template <int NR>
  OMNI_INLINE void CubeRows(int64_t mr, const float* X, const float* W, int64_t kc, float* acc) {
    switch (mr) {
      case 4: return Cube<4, NR>(X, W, kc, acc);
      case 3: return Cube<3, NR>(X, W, kc, acc);
      case 2: return Cube<2, NR>(X, W, kc, acc);
      default: return Cube<1, NR>(X, W, kc, acc);
    }
  }

  void Tile(int64_t mi, int64_t ni) {
    const int64_t K = f_.K();
    const int64_t m0 = mi * dq::kMC, mc = f_.M() - m0 < dq::kMC ? f_.M() - m0 : dq::kMC;
    const int64_t n0 = ni * t_.nt, nt = f_.N() - n0 < t_.nt ? f_.N() - n0 : t_.nt;
    float* acc = accbuf_.Get<float>().GetPhyAddr();
    float* W = wbuf_.Get<float>().GetPhyAddr();
    std::memset(acc, 0, static_cast<size_t>(mc * t_.nt) * sizeof(float));
    for (int64_t k0 = 0; k0 < K; k0 += t_.kc) {
      const int64_t kc = K - k0 < t_.kc ? K - k0 : t_.kc;
      f_.DequantTile(n0, nt, k0, kc, W, t_.kc);
      for (int64_t i = 0; i < mc; i += dq::kMR) {
        const int64_t mr = mc - i < dq::kMR ? mc - i : dq::kMR;
        const float* X = xf_ + (m0 + i) * K + k0;
        for (int64_t j = 0; j < nt; j += dq::kNR) {
          float* c = acc + i * t_.nt + j;
          if (nt - j >= 2) {
            CubeRows<2>(mr, X, W + j * t_.kc, kc, c);
          } else {
            CubeRows<1>(mr, X, W + j * t_.kc, kc, c);
          }
        }
      }
    }
    for (int64_t i = 0; i < mc; ++i) {
      T* o = out_ + (m0 + i) * out_stride_ + n0;
      const float* c = acc + i * t_.nt;
      for (int64_t j = 0; j < nt; ++j) o[j] = FromFloat<T>(bias_ ? c[j] + ToFloat(bias_[n0 + j]) : c[j]);
    }
  }

  const Fmt& f_;
  const dq::Tiling t_;
  const float* xf_;
  T* out_;
  int64_t out_stride_;
  const T* bias_;
  TPipe pipe_;
  TBuf<TPosition::B1> wbuf_;
  TBuf<TPosition::CO1> accbuf_;
};

// XT: storage type of x (W4A16: the activation dtype; FP8: unused, rows are bytes). T: output type.
template <typename XT, typename T, typename Fmt>
void DequantGemmLaunch(const Fmt& f, float* work, void* out, int64_t out_stride, const void* bias,
                       const OmniRuntime* rt) {
  const int64_t M = f.M(), K = f.K();
  auto widen = [&f, work, M, K]() {
    int64_t b, e;
    BlockRange(M, GetBlockIdx(), GetBlockNum(), &b, &e);
    for (int64_t m = b; m < e; ++m) f.template WidenRow<XT>(m, work + m * K);
  };
  LaunchBlocks(BlocksFor(M, K * 4, rt), rt, widen);
  const dq::Tiling t = dq::TilingFor(M, K);
  auto body = [&f, &t, work, out, out_stride, bias]() {
    KernelDequantGemm<T, Fmt> k(f, t, work, out, out_stride, bias);
    k.Process();
  };
  using Kern = KernelDequantGemm<T, Fmt>;
  const int64_t tiles = Kern::MTiles(f) * Kern::NTiles(f, t);
  LaunchBlocks(BlocksFor(tiles, t.nt * K * (M < dq::kMC ? (M + 7) / 8 : dq::kMC / 8), rt), rt, body);
}

inline void w4a16_gemm(const OmniW4A16Args* a, const OmniRuntime* rt) {
  if (a->M <= 0 || a->N <= 0) return;
  const dq::Int4Format f{{*a}};
  OMNI_DISPATCH_FLOAT(a->dtype, T, DequantGemmLaunch<T, T>(f, a->work, a->out, a->out_stride, a->bias, rt));
}

inline void fp8_block_gemm(const OmniFp8BlockArgs* a, const OmniRuntime* rt) {
  if (a->M <= 0 || a->N <= 0) return;
  const dq::Fp8Format f{{*a}};
  OMNI_DISPATCH_FLOAT(a->out_dtype, T, DequantGemmLaunch<uint8_t, T>(f, a->work, a->out, a->out_stride, a->bias, rt));
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
