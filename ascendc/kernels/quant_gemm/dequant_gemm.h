// Dequantize-in-the-UB GEMMs (W4A16 int4 group-wise, FP8 block-scaled), Ascend C style:
//   out[m, n] = sum_k xf[m, k] * wf[n, k] + bias[n],  fp32 accumulation, one rounding to the output dtype,
// where xf is x widened to fp32 (W4A16) or x_q * x_scale (FP8; the 128-group scale folds into the operand so
// the result equals "dequantize both, then multiply" up to the summation order), and wf the dequantized
// weight: (code - zero) * scale (int4) or LUT[fp8 byte] * block scale (FP8).
//
// Phase 1 (all blocks, rows split): x -> xf in the fp32 scratch `work` [M, K] (dequantized once, not per tile).
// Phase 2: tiles of (MC rows of x) x (NT rows of w). Per tile and K chunk of KC:
//   CopyIn + dequantize: NT x KC weights into the UB as fp32 (the format-specific part);
//   Compute: cube::DotF32<4, 2> over all MC rows adds into the UB accumulator tile [MC, NT];
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
constexpr int64_t kNT = 16, kKC = 512, kMC = 256, kMR = 4, kNR = 2;

// float8_e4m3fn -> fp32 for all 256 bit patterns (exact; 0x7F/0xFF are NaN, there is no inf). Used for the
// K tails; full runs of 8 use cube::E4m3x8 (same values, no gathers).
inline const float* Fp8Lut() {
  static const struct Lut {
    float v[256];
    Lut() {
      for (int b = 0; b < 256; ++b) {
        const int e = (b >> 3) & 15, m = b & 7;
        float f;
        if (e == 15 && m == 7) {
          f = __builtin_nanf("");
        } else if (e == 0) {
          f = std::ldexp(static_cast<float>(m), -9);  // subnormal: m/8 * 2^-6
        } else {
          f = std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
        }
        v[b] = (b & 0x80) ? -f : f;
      }
    }
  } lut;
  return lut.v;
}

// Format: how to widen a row of x into fp32 and dequantize a weight tile into the UB.
struct Int4Format {
  const OmniW4A16Args& a;
  int64_t K() const { return a.K; }
  int64_t M() const { return a.M; }
  int64_t N() const { return a.N; }
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
      float* d = dst + r * ldd - k0;
      for (int64_t g = k0 / G; g < (k0 + kc) / G; ++g) {
        const float s = a.scales[n * ng + g];
        const float z = a.zeros ? static_cast<float>(a.zeros[n * ng + g]) : 8.0f;
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) cube::Int4x32(wp + k / 2, z, s, d + k);
      }
    }
  }
};

struct Fp8Format {
  const OmniFp8BlockArgs& a;
  int64_t K() const { return a.K; }
  int64_t M() const { return a.M; }
  int64_t N() const { return a.N; }
  template <typename T>
  void WidenRow(int64_t m, float* dst) const {
    const float* lut = Fp8Lut();
    const uint8_t* src = a.x + m * a.x_stride;
    const int64_t kb = CeilDiv(a.K, 128);
    const float* xs = a.x_scale + m * kb;
    int64_t k = 0;
    for (; k + 8 <= a.K; k += 8) {
      const cube::v8f v = cube::E4m3x8(src + k) * xs[k >> 7];  // 8 | 128: one scale per 8
      std::memcpy(dst + k, &v, sizeof(v));
    }
    for (; k < a.K; ++k) dst[k] = lut[src[k]] * xs[k >> 7];
  }
  void DequantTile(int64_t n0, int64_t nr, int64_t k0, int64_t kc, float* dst, int64_t ldd) const {
    const float* lut = Fp8Lut();
    const int64_t kb = CeilDiv(a.K, 128);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t n = n0 + r;
      const uint8_t* wp = a.w + n * a.w_stride;
      const float* ws = a.w_scale + (n >> 7) * kb;
      float* d = dst + r * ldd - k0;
      int64_t k = k0;
      for (; k + 8 <= k0 + kc; k += 8) {
        const cube::v8f v = cube::E4m3x8(wp + k) * ws[k >> 7];
        std::memcpy(d + k, &v, sizeof(v));
      }
      for (; k < k0 + kc; ++k) d[k] = lut[wp[k]] * ws[k >> 7];
    }
  }
};
}  // namespace dq

template <typename T, typename Fmt>
class KernelDequantGemm {
 public:
  KernelDequantGemm(const Fmt& f, const float* xf, void* out, int64_t out_stride, const void* bias)
      : f_(f), xf_(xf), out_(static_cast<T*>(out)), out_stride_(out_stride), bias_(static_cast<const T*>(bias)) {
    pipe_.InitBuffer(wbuf_, static_cast<uint32_t>(dq::kNT * dq::kKC * sizeof(float)));
    pipe_.InitBuffer(accbuf_, static_cast<uint32_t>(dq::kMC * dq::kNT * sizeof(float)));
  }

  static int64_t MTiles(const Fmt& f) { return CeilDiv(f.M(), dq::kMC); }
  static int64_t NTiles(const Fmt& f) { return CeilDiv(f.N(), dq::kNT); }

  void Process() {
    const int64_t mt = MTiles(f_), nt = NTiles(f_);
    int64_t begin, end;
    BlockRange(mt * nt, GetBlockIdx(), GetBlockNum(), &begin, &end);
    for (int64_t tile = begin; tile < end; ++tile) Tile(tile / nt, tile % nt);
  }

 private:
  template <int MR, int NR>
  OMNI_INLINE void Cube(const float* X, const float* W, int64_t kc, float* acc) {
    cube::DotF32<MR, NR>(X, f_.K(), W, dq::kKC, kc, acc, dq::kNT);
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
    const int64_t n0 = ni * dq::kNT, nt = f_.N() - n0 < dq::kNT ? f_.N() - n0 : dq::kNT;
    float* acc = accbuf_.Get<float>().GetPhyAddr();
    float* W = wbuf_.Get<float>().GetPhyAddr();
    std::memset(acc, 0, static_cast<size_t>(mc * dq::kNT) * sizeof(float));
    for (int64_t k0 = 0; k0 < K; k0 += dq::kKC) {
      const int64_t kc = K - k0 < dq::kKC ? K - k0 : dq::kKC;
      f_.DequantTile(n0, nt, k0, kc, W, dq::kKC);
      for (int64_t i = 0; i < mc; i += dq::kMR) {
        const int64_t mr = mc - i < dq::kMR ? mc - i : dq::kMR;
        const float* X = xf_ + (m0 + i) * K + k0;
        for (int64_t j = 0; j < nt; j += dq::kNR) {
          float* c = acc + i * dq::kNT + j;
          if (nt - j >= 2) {
            CubeRows<2>(mr, X, W + j * dq::kKC, kc, c);
          } else {
            CubeRows<1>(mr, X, W + j * dq::kKC, kc, c);
          }
        }
      }
    }
    for (int64_t i = 0; i < mc; ++i) {
      T* o = out_ + (m0 + i) * out_stride_ + n0;
      const float* c = acc + i * dq::kNT;
      for (int64_t j = 0; j < nt; ++j) o[j] = FromFloat<T>(bias_ ? c[j] + ToFloat(bias_[n0 + j]) : c[j]);
    }
  }

  const Fmt& f_;
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
  auto body = [&f, work, out, out_stride, bias]() {
    KernelDequantGemm<T, Fmt> k(f, work, out, out_stride, bias);
    k.Process();
  };
  using Kern = KernelDequantGemm<T, Fmt>;
  const int64_t tiles = Kern::MTiles(f) * Kern::NTiles(f);
  LaunchBlocks(BlocksFor(tiles, dq::kNT * K * (M < dq::kMC ? (M + 7) / 8 : dq::kMC / 8), rt), rt, body);
}

inline void w4a16_gemm(const OmniW4A16Args* a, const OmniRuntime* rt) {
  if (a->M <= 0 || a->N <= 0) return;
  const dq::Int4Format f{*a};
  switch (a->dtype) {
    case OMNI_F32: return DequantGemmLaunch<float, float>(f, a->work, a->out, a->out_stride, a->bias, rt);
    case OMNI_F16: return DequantGemmLaunch<half, half>(f, a->work, a->out, a->out_stride, a->bias, rt);
    case OMNI_BF16:
      return DequantGemmLaunch<bfloat16_t, bfloat16_t>(f, a->work, a->out, a->out_stride, a->bias, rt);
  }
}

inline void fp8_block_gemm(const OmniFp8BlockArgs* a, const OmniRuntime* rt) {
  if (a->M <= 0 || a->N <= 0) return;
  const dq::Fp8Format f{*a};
  switch (a->out_dtype) {
    case OMNI_F32: return DequantGemmLaunch<uint8_t, float>(f, a->work, a->out, a->out_stride, a->bias, rt);
    case OMNI_F16: return DequantGemmLaunch<uint8_t, half>(f, a->work, a->out, a->out_stride, a->bias, rt);
    case OMNI_BF16: return DequantGemmLaunch<uint8_t, bfloat16_t>(f, a->work, a->out, a->out_stride, a->bias, rt);
  }
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
