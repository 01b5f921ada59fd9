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
#include "omni/ops/norm.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
using namespace AscendC;

template <typename T>
class KernelRmsNorm {
 public:
  static constexpr bool kF32 = std::is_same_v<T, float>;

  // UB bytes per chunk element: x and residual queues (T), fp32 work, fp32 weight, output queue (T).
  static constexpr uint32_t kBytesPerElem = 3 * sizeof(T) + (kF32 ? 8 : 12);
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
    if (!kF32) pipe_.InitBuffer(work2_, c * sizeof(float));
    pipe_.InitBuffer(weight_, c * sizeof(float));
    pipe_.InitBuffer(scalar_, 64);
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
    LocalTensor<T> xt = in_x_.AllocTensor<T>();
    DataCopy(xt, xg_[r * a_.x_stride + c0], n);
    in_x_.EnQue(xt);
    xt = in_x_.DeQue<T>();
    LocalTensor<float> xf = work_.Get<float>();
    if (a_.residual) {
      LocalTensor<T> rt = in_res_.AllocTensor<T>();
      DataCopy(rt, rg_[r * a_.residual_stride + c0], n);
      in_res_.EnQue(rt);
      rt = in_res_.DeQue<T>();
      if constexpr (kF32) {
        Add(xf, xt, rt, n);
        DataCopy(rog_[r * a_.residual_out_stride + c0], xf, n);
      } else {
        LocalTensor<T> st = out_.AllocTensor<T>();
        LocalTensor<float> rf = work2_.Get<float>();
        Cast(xf, xt, RoundMode::CAST_NONE, n);
        Cast(rf, rt, RoundMode::CAST_NONE, n);
        Add(xf, xf, rf, n);
        Cast(st, xf, RoundMode::CAST_RINT, n);  // the residual stream is kept in T, as in HF
        Cast(xf, st, RoundMode::CAST_NONE, n);
        out_.EnQue(st);
        st = out_.DeQue<T>();
        DataCopy(rog_[r * a_.residual_out_stride + c0], st, n);
        out_.FreeTensor(st);
      }
      in_res_.FreeTensor(rt);
    } else {
      if constexpr (kF32) {
        DataCopy(xf, xt, n);
      } else {
        Cast(xf, xt, RoundMode::CAST_NONE, n);
      }
    }
    in_x_.FreeTensor(xt);
    LocalTensor<float> sq = kF32 ? out_.AllocTensor<float>() : work2_.Get<float>();
    LocalTensor<float> s = scalar_.Get<float>();
    Mul(sq, xf, xf, n);
    ReduceSum(s, sq, sq, n);
    return s.GetValue(0);
  }

  // Pass 2 for rows longer than one chunk: bring the (rounded) input chunk back into work_.
  void ReloadChunk(int64_t r, int64_t c0, int32_t n) {
    LocalTensor<T> xt = in_x_.AllocTensor<T>();
    if (a_.residual) {
      DataCopy(xt, rog_[r * a_.residual_out_stride + c0], n);
    } else {
      DataCopy(xt, xg_[r * a_.x_stride + c0], n);
    }
    Cast(work_.Get<float>(), xt, RoundMode::CAST_NONE, n);
    in_x_.FreeTensor(xt);
  }

  void NormChunk(int64_t r, int64_t c0, int32_t n, float rstd) {
    LocalTensor<float> xf = work_.Get<float>();
    LocalTensor<float> wf = weight_.Get<float>();
    LocalTensor<T> ot = out_.AllocTensor<T>();
    Muls(xf, xf, rstd, n);
    if constexpr (kF32) {
      Mul(ot, xf, wf, n);
    } else {
      LocalTensor<T> yt = in_res_.AllocTensor<T>();
      Cast(yt, xf, RoundMode::CAST_RINT, n);  // T(x * rstd), as HF casts before the weight multiply
      Cast(xf, yt, RoundMode::CAST_NONE, n);
      Mul(xf, xf, wf, n);
      Cast(ot, xf, RoundMode::CAST_RINT, n);
    }
    out_.EnQue(ot);
    ot = out_.DeQue<T>();
    DataCopy(og_[r * a_.out_stride + c0], ot, n);
    out_.FreeTensor(ot);
  }

  const OmniRmsNormArgs& a_;
  int64_t chunk_ = 0, row_begin_ = 0, row_end_ = 0;
  TPipe pipe_;
  TQue<TPosition::VECIN, 1> in_x_, in_res_;
  TQue<TPosition::VECOUT, 1> out_;
  TBuf<TPosition::VECCALC> work_, work2_, weight_, scalar_;
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
  switch (a->dtype) {
    case OMNI_F32: return RmsNormLaunch<float>(a, rt);
    case OMNI_F16: return RmsNormLaunch<half>(a, rt);
    case OMNI_BF16: return RmsNormLaunch<bfloat16_t>(a, rt);
  }
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
