// SiLU-and-mul (SwiGLU): out[r, i] = T(silu(x[r, i]) * x[r, d + i]) for i < d, computed in fp32.
// Blocks own contiguous row ranges; each row is split into UB-sized chunks of the gate and up halves.
#pragma once
#include <type_traits>

#include "host/kernel_operator.h"
#include "omni/ops/activation.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
using namespace AscendC;

template <typename T>
class KernelSiluAndMul {
 public:
  static constexpr bool kF32 = std::is_same_v<T, float>;
  // gate, up and out queues (T) plus two fp32 work buffers (non-fp32 only)
  static constexpr uint32_t kBytesPerElem = 3 * sizeof(T) + (kF32 ? 0 : 8);

  explicit KernelSiluAndMul(const OmniSiluAndMulArgs& a) : a_(a) {
    int64_t max_chunk = (kUBSize - 1024) / kBytesPerElem / 64 * 64;
    chunk_ = a.d < max_chunk ? a.d : max_chunk;
    BlockRange(a.rows, GetBlockIdx(), GetBlockNum(), &row_begin_, &row_end_);
    const uint32_t c = static_cast<uint32_t>(chunk_);
    pipe_.InitBuffer(in_gate_, 1, c * sizeof(T));
    pipe_.InitBuffer(in_up_, 1, c * sizeof(T));
    pipe_.InitBuffer(out_, 1, c * sizeof(T));
    if (!kF32) {
      pipe_.InitBuffer(gf_, c * sizeof(float));
      pipe_.InitBuffer(uf_, c * sizeof(float));
    }
    xg_.SetGlobalBuffer((__gm__ T*)a.x);
    og_.SetGlobalBuffer((__gm__ T*)a.out);
  }

  void Process() {
    for (int64_t r = row_begin_; r < row_end_; ++r) {
      for (int64_t c0 = 0; c0 < a_.d; c0 += chunk_) {
        int32_t n = static_cast<int32_t>(a_.d - c0 < chunk_ ? a_.d - c0 : chunk_);
        CopyIn(r, c0, n);
        Compute(n);
        CopyOut(r, c0, n);
      }
    }
  }

 private:
  void CopyIn(int64_t r, int64_t c0, int32_t n) {
    LocalTensor<T> g = in_gate_.AllocTensor<T>();
    LocalTensor<T> u = in_up_.AllocTensor<T>();
    DataCopy(g, xg_[r * a_.x_stride + c0], n);
    DataCopy(u, xg_[r * a_.x_stride + a_.d + c0], n);
    in_gate_.EnQue(g);
    in_up_.EnQue(u);
  }
  void Compute(int32_t n) {
    LocalTensor<T> g = in_gate_.DeQue<T>();
    LocalTensor<T> u = in_up_.DeQue<T>();
    LocalTensor<T> o = out_.AllocTensor<T>();
    if constexpr (kF32) {
      Silu(o, g, n);
      Mul(o, o, u, n);
    } else {
      LocalTensor<float> gf = gf_.Get<float>(), uf = uf_.Get<float>();
      Cast(gf, g, RoundMode::CAST_NONE, n);
      Cast(uf, u, RoundMode::CAST_NONE, n);
      Silu(gf, gf, n);
      Mul(gf, gf, uf, n);
      Cast(o, gf, RoundMode::CAST_RINT, n);
    }
    out_.EnQue(o);
    in_gate_.FreeTensor(g);
    in_up_.FreeTensor(u);
  }
  void CopyOut(int64_t r, int64_t c0, int32_t n) {
    LocalTensor<T> o = out_.DeQue<T>();
    DataCopy(og_[r * a_.out_stride + c0], o, n);
    out_.FreeTensor(o);
  }

  const OmniSiluAndMulArgs& a_;
  int64_t chunk_ = 0, row_begin_ = 0, row_end_ = 0;
  TPipe pipe_;
  TQue<TPosition::VECIN, 1> in_gate_, in_up_;
  TQue<TPosition::VECOUT, 1> out_;
  TBuf<TPosition::VECCALC> gf_, uf_;
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
  switch (a->dtype) {
    case OMNI_F32: return SiluAndMulLaunch<float>(a, rt);
    case OMNI_F16: return SiluAndMulLaunch<half>(a, rt);
    case OMNI_BF16: return SiluAndMulLaunch<bfloat16_t>(a, rt);
  }
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
