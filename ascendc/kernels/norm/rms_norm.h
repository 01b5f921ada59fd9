// RMSNorm and fused residual-add + RMSNorm, Ascend C style.
//   no residual:   out = T(T(x * rstd) * w),            rstd = 1 / sqrt(mean(x^2) + eps)
//   with residual: s = T(x + residual); residual_out = s; out = T(T(s * rstd) * w)
// The double rounding T(T(.) * w) and the rounded sum match HF's LlamaRMSNorm and vLLM's kernels bit for bit
// up to the fp32 summation order. Accumulation is fp32 for every T.
//
// Tiling: blocks own contiguous row ranges (blockDim = cores). A row is processed in chunks of at most
// `chunk` elements; when the whole row fits the UB (one chunk) it is read from memory once, otherwise a second
// pass re-reads the row (from residual_out when there is a residual, which already holds the rounded sum).
#pragma once
#include <type_traits>

#include "host/kernel_operator.h"
#include "host/simd.h"
#include "omni/ops/norm.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
using namespace AscendC;

template <typename T>
class KernelRmsNorm {
 public:
  static constexpr bool kF32 = std::is_same_v<T, float>;

  // UB bytes per chunk element: x, residual and output queues (T), fp32 work and fp32 weight.
  static constexpr uint32_t kBytesPerElem = 3 * sizeof(T) + 8;
  static int64_t ChunkFor(int64_t hidden) {
    int64_t max_chunk = (kUBSize - 4096) / kBytesPerElem / 64 * 64;
    return hidden <= max_chunk ? hidden : max_chunk;
  }

  explicit KernelRmsNorm(const OmniRmsNormArgs& a) : a_(a) {
    chunk_ = ChunkFor(a.hidden);
    int64_t begin, end;
    BlockRange(a.rows, GetBlockIdx(), GetBlockNum(), &begin, &end);
    row_begin_ = begin;
    row_end_ = end;
    const uint32_t c = static_cast<uint32_t>(chunk_);
    pipe_.InitBuffer(in_x_, 1, c * sizeof(T));
    pipe_.InitBuffer(in_res_, 1, c * sizeof(T));
    pipe_.InitBuffer(out_, 1, c * sizeof(T));
    pipe_.InitBuffer(work_, c * sizeof(float));
    pipe_.InitBuffer(weight_, c * sizeof(float));
    xg_.SetGlobalBuffer((__gm__ T*)a.x);
    wg_.SetGlobalBuffer((__gm__ T*)a.weight, a.hidden);
    og_.SetGlobalBuffer((__gm__ T*)a.out);
    if (a.residual) {
      rg_.SetGlobalBuffer((__gm__ T*)a.residual);
      rog_.SetGlobalBuffer((__gm__ T*)a.residual_out);
    }
  }

  void Process() {
    if (row_begin_ >= row_end_) return;
    const bool one_chunk = chunk_ == a_.hidden;
    if (one_chunk) LoadWeight(0, static_cast<int32_t>(chunk_));
    for (int64_t r = row_begin_; r < row_end_; ++r) {
      float sumsq = 0.0f;
      for (int64_t c0 = 0; c0 < a_.hidden; c0 += chunk_) {
        int32_t n = static_cast<int32_t>(a_.hidden - c0 < chunk_ ? a_.hidden - c0 : chunk_);
        sumsq += SumChunk(r, c0, n);
      }
      const float rstd = 1.0f / __builtin_sqrtf(sumsq / static_cast<float>(a_.hidden) + a_.eps);
      for (int64_t c0 = 0; c0 < a_.hidden; c0 += chunk_) {
        int32_t n = static_cast<int32_t>(a_.hidden - c0 < chunk_ ? a_.hidden - c0 : chunk_);
        if (!one_chunk) {
          LoadWeight(c0, n);
          ReloadChunk(r, c0, n);
        }
        NormChunk(r, c0, n, rstd);
      }
    }
  }

 private:
  void LoadWeight(int64_t c0, int32_t n) {
    LocalTensor<float> wf = weight_.Get<float>();
    if constexpr (kF32) {
      DataCopy(wf, wg_[c0], n);
    } else {
      LocalTensor<T> wt = in_res_.AllocTensor<T>();  // staging only
      DataCopy(wt, wg_[c0], n);
      Cast(wf, wt, RoundMode::CAST_NONE, n);
    }
  }

  // CopyIn + Compute of pass 1: leaves the (rounded) fp32 row chunk in work_ and returns its sum of squares.
  float SumChunk(int64_t r, int64_t c0, int32_t n) {
    LocalTensor<T> xt = CopyIn(in_x_, xg_[r * a_.x_stride + c0], n);
    LocalTensor<float> xf = work_.Get<float>();
    float sumsq;
    if (a_.residual) {
      LocalTensor<T> rt = CopyIn(in_res_, rg_[r * a_.residual_stride + c0], n);
      GlobalTensor<T> dst = rog_[r * a_.residual_out_stride + c0];
      LocalTensor<T> st = AllocOut(out_, dst, n);
      sumsq = AddRoundSquareSum<true>(xf, st, xt, rt, n);
      CopyOut(out_, dst, st, n);
      Release(in_res_, rt);
    } else {
      sumsq = AddRoundSquareSum<false>(xf, xt, xt, xt, n);
    }
    Release(in_x_, xt);
    return sumsq;
  }

  // Cast + Add + Cast + Mul + ReduceSum of the NPU as one pass of the host's 8-lane vector unit:
  // s = T(x [+ r]) goes to st (the residual stream, kept in T as in HF), float(s) to xf; returns sum(xf^2).
  template <bool kResidual>
  static float AddRoundSquareSum(const LocalTensor<float>& xf_t, const LocalTensor<T>& st_t, const LocalTensor<T>& x_t,
                                 const LocalTensor<T>& r_t, int32_t n) {
    using namespace simd;
    float* OMNI_RESTRICT xf = xf_t.GetPhyAddr();
    T* st = st_t.GetPhyAddr();  // may be the residual itself (in place)
    const T* x = x_t.GetPhyAddr();
    const T* rr = r_t.GetPhyAddr();
    // VW: 16 lanes in the AVX-512 libraries, 8 otherwise.
    VW acc0 = Set1W(0.0f), acc1 = Set1W(0.0f);
    auto step = [&](int32_t i, VW& acc) {
      VW v = LoadW(x + i);
      if constexpr (kResidual) {
        v = StoreRound(st + i, Add(v, LoadW(rr + i)));
      }
      Store(xf + i, v);
      acc = Fma(v, v, acc);
    };
    int32_t i = 0;
    for (; i + 2 * kW <= n; i += 2 * kW) {
      step(i, acc0);
      step(i + kW, acc1);
    }
    if (i + kW <= n) {
      step(i, acc0);
      i += kW;
    }
    float total = Sum(Add(acc0, acc1));
    for (; i < n; ++i) {
      float f = ToFloat(x[i]);
      if constexpr (kResidual) {
        const T v = FromFloat<T>(f + ToFloat(rr[i]));
        st[i] = v;
        f = ToFloat(v);
      }
      xf[i] = f;
      total += f * f;
    }
    return total;
  }

  // Pass 2 for rows longer than one chunk: bring the (rounded) input chunk back into work_.
  void ReloadChunk(int64_t r, int64_t c0, int32_t n) {
    LocalTensor<T> xt = a_.residual ? CopyIn(in_x_, rog_[r * a_.residual_out_stride + c0], n)
                                    : CopyIn(in_x_, xg_[r * a_.x_stride + c0], n);
    Cast(work_.Get<float>(), xt, RoundMode::CAST_NONE, n);
    Release(in_x_, xt);
  }

  void NormChunk(int64_t r, int64_t c0, int32_t n, float rstd) {
    GlobalTensor<T> dst = og_[r * a_.out_stride + c0];
    LocalTensor<T> ot = AllocOut(out_, dst, n);
    // Fused Muls + Cast + Cast + Mul + Cast: T(T(x * rstd) * w), HF's double rounding (a no-op for fp32).
    const float* OMNI_RESTRICT xf = work_.Get<float>().GetPhyAddr();
    const float* OMNI_RESTRICT wf = weight_.Get<float>().GetPhyAddr();
    T* o = ot.GetPhyAddr();
    const simd::VW rs = simd::Set1W(rstd);
    int32_t i = 0;
    for (; i + simd::kW <= n; i += simd::kW)
      simd::Store(o + i, simd::Mul(simd::Round(simd::Mul(simd::LoadW(xf + i), rs), o), simd::LoadW(wf + i)));
    for (; i < n; ++i) o[i] = FromFloat<T>(ToFloat(FromFloat<T>(xf[i] * rstd)) * wf[i]);
    CopyOut(out_, dst, ot, n);
  }

  const OmniRmsNormArgs& a_;
  int64_t chunk_ = 0, row_begin_ = 0, row_end_ = 0;
  TPipe pipe_;
  TQue<TPosition::VECIN, 1> in_x_, in_res_;
  TQue<TPosition::VECOUT, 1> out_;
  TBuf<TPosition::VECCALC> work_, weight_;
  GlobalTensor<T> xg_, wg_, og_, rg_, rog_;
};

template <typename T>
void RmsNormLaunch(const OmniRmsNormArgs* a, const OmniRuntime* rt) {
  auto body = [a]() {
    KernelRmsNorm<T> k(*a);
    k.Process();
  };
  const int64_t bytes_per_row = a->hidden * static_cast<int64_t>(sizeof(T)) * (a->residual ? 4 : 2);
  LaunchBlocks(BlocksFor(a->rows, bytes_per_row, rt), rt, body);
}

inline void rms_norm(const OmniRmsNormArgs* a, const OmniRuntime* rt) {
  OMNI_DISPATCH_FLOAT(a->dtype, T, RmsNormLaunch<T>(a, rt));
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
