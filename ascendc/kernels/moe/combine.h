// The weighted combine of the MoE steps, shared by moe_combine (moe_ops.h) and the fused block's last step
// (fused_moe.h, moe_tiles.h): out[t] = T(sum_j topk_weights[t, j] * y[row(t, j)]), fp32 accumulation, rounded
// once; a row of -1 (an expert on another rank) adds nothing.
#pragma once
#include <algorithm>

#include "host/kernel_operator.h"
#include "host/simd.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace moe {
using namespace AscendC;

// a: the op's arguments (tokens, top_k, hidden_size, topk_weights, out, out_stride); rows [tokens, top_k];
// y_row(r): row r of the expert outputs (fp32 or T); bytes: per token, for sizing the launch. kVecStore: round
// with the vector unit's stores (simd::Store) where a whole vector fits, else element by element (FromFloat).
template <typename T, bool kVecStore, typename Args, typename YRowFn>
void CombineTokens(const Args& a, const int32_t* rows, YRowFn y_row, int64_t bytes, const OmniRuntime* rt) {
  const int64_t K = a.top_k, H = a.hidden_size;
  T* out = static_cast<T*>(a.out);
  auto body = [&]() {
    int64_t t0, t1;
    BlockRange(a.tokens, GetBlockIdx(), GetBlockNum(), &t0, &t1);
    TPipe pipe;
    TBuf<TPosition::VECCALC> accb;
    const int64_t hc = std::min<int64_t>(H, 8192);
    pipe.InitBuffer(accb, hc * sizeof(float));
    float* acc = accb.Get<float>().GetPhyAddr();
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t h0 = 0; h0 < H; h0 += hc) {
        const int64_t n = std::min<int64_t>(hc, H - h0);
        for (int64_t i = 0; i < n; ++i) acc[i] = 0.0f;
        for (int64_t j = 0; j < K; ++j) {
          const int32_t r = rows[t * K + j];
          if (r < 0) continue;
          const float w = a.topk_weights[t * K + j];
          const auto* y = y_row(r) + h0;
          for (int64_t i = 0; i < n; ++i) acc[i] += w * ToFloat(y[i]);
        }
        T* o = out + t * a.out_stride + h0;
        int64_t i = 0;
        if constexpr (kVecStore) {
          for (; i + simd::kW <= n; i += simd::kW) simd::Store(o + i, simd::LoadW(acc + i));  // one rounding
        }
        for (; i < n; ++i) o[i] = FromFloat<T>(acc[i]);
      }
    }
  };
  LaunchBlocks(BlocksFor(a.tokens, bytes, rt), rt, body);
}

}  // namespace moe
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
