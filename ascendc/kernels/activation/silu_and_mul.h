// SiLU-and-mul (SwiGLU): out[r, i] = T(silu(x[r, i]) * x[r, d + i]) for i < d, computed in fp32.
// Blocks own contiguous row ranges; each row is split into UB-sized chunks of the gate and up halves.
#pragma once
#include <type_traits>

#include "host/kernel_operator.h"
#include "host/simd.h"
#include "omni/ops/activation.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
using namespace AscendC;

template <typename T>
class KernelSiluAndMul {
 public:
  // gate, up and out queues (T); the fused compute needs no fp32 scratch
  static constexpr uint32_t kBytesPerElem = 3 * sizeof(T);

  explicit KernelSiluAndMul(const OmniSiluAndMulArgs& a) : a_(a) {
    int64_t max_chunk = (kUBSize - 1024) / kBytesPerElem / 64 * 64;
    chunk_ = a.d < max_chunk ? a.d : max_chunk;
    BlockRange(a.rows, GetBlockIdx(), GetBlockNum(), &row_begin_, &row_end_);
    const uint32_t c = static_cast<uint32_t>(chunk_);
    pipe_.InitBuffer(in_gate_, 1, c * sizeof(T));
    pipe_.InitBuffer(in_up_, 1, c * sizeof(T));
    pipe_.InitBuffer(out_, 1, c * sizeof(T));
    xg_.SetGlobalBuffer((__gm__ T*)a.x);
    og_.SetGlobalBuffer((__gm__ T*)a.out);
  }

  void Process() {
    for (int64_t r = row_begin_; r < row_end_; ++r) {
      for (int64_t c0 = 0; c0 < a_.d; c0 += chunk_) {
        const int32_t n = static_cast<int32_t>(a_.d - c0 < chunk_ ? a_.d - c0 : chunk_);
        LocalTensor<T> g = CopyIn(in_gate_, xg_[r * a_.x_stride + c0], n);
        LocalTensor<T> u = CopyIn(in_up_, xg_[r * a_.x_stride + a_.d + c0], n);
        GlobalTensor<T> dst = og_[r * a_.out_stride + c0];
        LocalTensor<T> o = AllocOut(out_, dst, n);
        Compute(o, g, u, n);
        CopyOut(out_, dst, o, n);
        Release(in_gate_, g);
        Release(in_up_, u);
      }
    }
  }

 private:
  // Cast + Silu + Mul + Cast of the NPU, in slices of 64: the conversions go through the 8-lane vector
  // helpers and the float math through a loop the compiler vectorises (VecExpF is branch-free).
  static void Compute(const LocalTensor<T>& o_t, const LocalTensor<T>& g_t, const LocalTensor<T>& u_t, int32_t n) {
    T* o = o_t.GetPhyAddr();
    const T* g = g_t.GetPhyAddr();
    const T* u = u_t.GetPhyAddr();
    alignas(64) float gf[64], uf[64];
    int32_t i = 0;
    for (; i + 64 <= n; i += 64) {
      for (int j = 0; j < 64; j += 8) {
        simd::Store(gf + j, simd::Load(g + i + j));
        simd::Store(uf + j, simd::Load(u + i + j));
      }
      for (int j = 0; j < 64; ++j) gf[j] = gf[j] / (1.0f + VecExpF(-gf[j])) * uf[j];
      for (int j = 0; j < 64; j += 8) simd::Store(o + i + j, simd::Load(gf + j));
    }
    for (; i < n; ++i) {
      const float x = ToFloat(g[i]);
      o[i] = FromFloat<T>(x / (1.0f + VecExpF(-x)) * ToFloat(u[i]));
    }
  }

  const OmniSiluAndMulArgs& a_;
  int64_t chunk_ = 0, row_begin_ = 0, row_end_ = 0;
  TPipe pipe_;
  TQue<TPosition::VECIN, 1> in_gate_, in_up_;
  TQue<TPosition::VECOUT, 1> out_;
  GlobalTensor<T> xg_, og_;
};

template <typename T>
void SiluAndMulLaunch(const OmniSiluAndMulArgs* a, const OmniRuntime* rt) {
  auto body = [a]() {
    KernelSiluAndMul<T> k(*a);
    k.Process();
  };
  LaunchBlocks(BlocksFor(a->rows, a->d * 3 * static_cast<int64_t>(sizeof(T)), rt), rt, body);
}

inline void silu_and_mul(const OmniSiluAndMulArgs* a, const OmniRuntime* rt) {
  OMNI_DISPATCH_FLOAT(a->dtype, T, SiluAndMulLaunch<T>(a, rt));
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
