// Rotary position embedding (vLLM semantics): for every token t and head h, rotate the first rotary_dim dims
// of q[t, h] and k[t, h] by the angle row cos_sin_cache[positions[t]] = cat(cos[rot/2], sin[rot/2]).
//   neox (halves):      o[i] = x[i] c[i] - x[i+r/2] s[i];   o[i+r/2] = x[i+r/2] c[i] + x[i] s[i]
//   gpt-j (interleaved): o[2i] = x[2i] c[i] - x[2i+1] s[i]; o[2i+1] = x[2i+1] c[i] + x[2i] s[i]
// Dims past rotary_dim pass through. Math in fp32, one rounding to T.
// Blocks own contiguous token ranges; per token the cos/sin row is staged once in the UB and reused by
// every q and k head (DeepSeek's MLA has 128 q heads sharing one k_pe head).
#pragma once
#include <type_traits>

#include "host/kernel_operator.h"
#include "omni/ops/rotary.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
using namespace AscendC;

template <typename T, typename C>
class KernelRotary {
 public:
  explicit KernelRotary(const OmniRotaryArgs& a) : a_(a) {
    BlockRange(a.tokens, GetBlockIdx(), GetBlockNum(), &tok_begin_, &tok_end_);
    const uint32_t hs = static_cast<uint32_t>(a.head_size);
    pipe_.InitBuffer(in_, 1, hs * sizeof(T));
    pipe_.InitBuffer(out_, 1, hs * sizeof(T));
    pipe_.InitBuffer(xf_, hs * sizeof(float));
    pipe_.InitBuffer(cs_raw_, static_cast<uint32_t>(a.rotary_dim) * sizeof(C));
    pipe_.InitBuffer(cs_, static_cast<uint32_t>(a.rotary_dim) * sizeof(float));
    cache_.SetGlobalBuffer((__gm__ C*)a.cos_sin_cache, a.max_position * a.rotary_dim);
  }

  void Process() {
    GlobalTensor<T> q, k, qo, ko;
    q.SetGlobalBuffer((__gm__ T*)a_.q);
    qo.SetGlobalBuffer((__gm__ T*)a_.q_out);
    if (a_.k_heads > 0) {
      k.SetGlobalBuffer((__gm__ T*)a_.k);
      ko.SetGlobalBuffer((__gm__ T*)a_.k_out);
    }
    for (int64_t t = tok_begin_; t < tok_end_; ++t) {
      LoadAngles(a_.positions[t]);
      for (int64_t h = 0; h < a_.q_heads; ++h)
        RotateHead(q[t * a_.q_token_stride + h * a_.q_head_stride], qo[t * a_.qo_token_stride + h * a_.qo_head_stride]);
      for (int64_t h = 0; h < a_.k_heads; ++h)
        RotateHead(k[t * a_.k_token_stride + h * a_.k_head_stride], ko[t * a_.ko_token_stride + h * a_.ko_head_stride]);
    }
  }

 private:
  void LoadAngles(int64_t pos) {
    const int32_t rd = static_cast<int32_t>(a_.rotary_dim);
    LocalTensor<C> raw = cs_raw_.Get<C>();
    DataCopy(raw, cache_[pos * a_.rotary_dim], rd);
    Cast(cs_.Get<float>(), raw, RoundMode::CAST_NONE, rd);
  }

  void RotateHead(const GlobalTensor<T>& src, const GlobalTensor<T>& dst) {
    const int32_t n = a_.copy_tail ? static_cast<int32_t>(a_.head_size) : static_cast<int32_t>(a_.rotary_dim);
    LocalTensor<T> xt = CopyIn(in_, src, n);
    LocalTensor<float> xf = xf_.Get<float>();
    Cast(xf, xt, RoundMode::CAST_NONE, n);
    Release(in_, xt);
    Rotate(xf);
    LocalTensor<T> ot = AllocOut(out_, dst, n);
    Cast(ot, xf, RoundMode::CAST_RINT, n);
    CopyOut(out_, dst, ot, n);
  }

  // In-UB rotation of the first rotary_dim dims of one head (fp32).
  void Rotate(const LocalTensor<float>& xf) {
    const int64_t half_rd = a_.rotary_dim / 2;
    float* OMNI_RESTRICT x = xf.GetPhyAddr();
    const float* c = cs_.Get<float>().GetPhyAddr();
    const float* s = c + half_rd;
    if (a_.is_neox) {
      float* OMNI_RESTRICT x2 = x + half_rd;
      for (int64_t i = 0; i < half_rd; ++i) {
        const float a = x[i], b = x2[i];
        x[i] = a * c[i] - b * s[i];
        x2[i] = b * c[i] + a * s[i];
      }
    } else {
      for (int64_t i = 0; i < half_rd; ++i) {
        const float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * c[i] - b * s[i];
        x[2 * i + 1] = b * c[i] + a * s[i];
      }
    }
  }

  const OmniRotaryArgs& a_;
  int64_t tok_begin_ = 0, tok_end_ = 0;
  TPipe pipe_;
  TQue<TPosition::VECIN, 1> in_;
  TQue<TPosition::VECOUT, 1> out_;
  TBuf<TPosition::VECCALC> xf_, cs_raw_, cs_;
  GlobalTensor<C> cache_;
};

template <typename T, typename C>
void RotaryLaunch(const OmniRotaryArgs* a, const OmniRuntime* rt) {
  auto body = [a]() {
    KernelRotary<T, C> k(*a);
    k.Process();
  };
  const int64_t bytes = (a->q_heads + a->k_heads) * a->head_size * 2 * static_cast<int64_t>(sizeof(T));
  LaunchBlocks(BlocksFor(a->tokens, bytes, rt), rt, body);
}

inline void rotary_embedding(const OmniRotaryArgs* a, const OmniRuntime* rt) {
  OMNI_DISPATCH_FLOAT(a->dtype, T, OMNI_DISPATCH_FLOAT(a->cache_dtype, C, RotaryLaunch<T, C>(a, rt)));
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
