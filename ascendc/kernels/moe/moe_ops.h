// The unfused MoE steps: routing (top-k / grouped top-k), dispatch (counting sort + gather), grouped GEMM,
// combine. fused_moe.h does all of it in one call; these serve models and tools that need the pieces
// (expert parallelism, custom expert MLPs, tests).
#pragma once
#include <algorithm>
#include <cmath>

#include "kernels/moe/combine.h"
#include "kernels/moe/expert_gemm.h"
#include "kernels/moe/panel_gemm.h"
#include "omni/ops/moe.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace moe {

// ---- routing: one token per iteration, scores in the UB ----------------------------------------------------
// Index of the largest sel[i] over i in [0, n) with !taken[i]; ties and NaNs go to the lowest index (the
// first untaken index is the default, so the result is always in range).
OMNI_INLINE int64_t ArgMaxUntaken(const float* sel, const uint8_t* taken, int64_t n) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (taken[i]) continue;
    if (best < 0 || sel[i] > sel[best]) best = i;
  }
  return best;
}

template <typename T>
void RouteRun(const OmniMoeRouteArgs& a, const OmniRuntime* rt) {
  const int64_t E = a.num_experts, K = a.top_k;
  const bool grouped = a.num_groups > 1;
  const int64_t G = grouped ? a.num_groups : 1, per = E / G;
  auto body = [&]() {
    int64_t t0, t1;
    BlockRange(a.tokens, GetBlockIdx(), GetBlockNum(), &t0, &t1);
    TPipe pipe;  // omni_moe_route_ub_bytes(E, G) bytes in all (checked against the UB by the bindings)
    TBuf<TPosition::VECCALC> sb, selb, takenb, gb;
    pipe.InitBuffer(sb, E * sizeof(float));
    pipe.InitBuffer(selb, E * sizeof(float));
    pipe.InitBuffer(takenb, E);
    pipe.InitBuffer(gb, G * (sizeof(float) + 1));
    float* s = sb.Get<float>().GetPhyAddr();
    float* sel = selb.Get<float>().GetPhyAddr();
    uint8_t* taken = takenb.Get<uint8_t>().GetPhyAddr();
    float* gs = gb.Get<float>().GetPhyAddr();
    uint8_t* gtaken = reinterpret_cast<uint8_t*>(gs + G);
    const T* logits = static_cast<const T*>(a.logits);
    for (int64_t t = t0; t < t1; ++t) {
      const T* l = logits + t * a.logits_stride;
      if (a.scoring == OMNI_MOE_SOFTMAX) {
        float m = -INFINITY;
        for (int64_t e = 0; e < E; ++e) {
          s[e] = ToFloat(l[e]);
          m = s[e] > m ? s[e] : m;
        }
        float sum = 0.0f;
        for (int64_t e = 0; e < E; ++e) {
          s[e] = VecExpF(s[e] - m);
          sum += s[e];
        }
        const float inv = 1.0f / sum;
        for (int64_t e = 0; e < E; ++e) s[e] *= inv;
      } else {
        for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + VecExpF(-ToFloat(l[e])));
      }
      for (int64_t e = 0; e < E; ++e) {
        sel[e] = a.correction_bias != nullptr ? s[e] + a.correction_bias[e] : s[e];
        taken[e] = 0;
      }
      if (grouped) {
        // DeepSeek-V3 (bias given): a group's score is the sum of its two best; otherwise its best.
        for (int64_t g = 0; g < G; ++g) {
          const float* x = sel + g * per;
          float b1 = -INFINITY, b2 = -INFINITY;
          for (int64_t i = 0; i < per; ++i) {
            if (x[i] > b1) {
              b2 = b1;
              b1 = x[i];
            } else if (x[i] > b2) {
              b2 = x[i];
            }
          }
          gs[g] = (a.correction_bias != nullptr && per >= 2) ? b1 + b2 : b1;
          gtaken[g] = 0;
        }
        for (int64_t j = 0; j < a.topk_groups; ++j) gtaken[ArgMaxUntaken(gs, gtaken, G)] = 1;
        // Experts of dropped groups cannot be chosen: mark them taken.
        for (int64_t g = 0; g < G; ++g)
          if (!gtaken[g]) std::memset(taken + g * per, 1, per);
      }
      float* w = a.topk_weights + t * K;
      int32_t* ids = a.topk_ids + t * K;
      float total = 0.0f;
      for (int64_t j = 0; j < K; ++j) {
        int64_t e = ArgMaxUntaken(sel, taken, E);
        if (e < 0) e = 0;  // unreachable: the bindings check top_k <= the experts left after group limiting
        taken[e] = 1;
        ids[j] = static_cast<int32_t>(e);
        w[j] = s[e];
        total += s[e];
      }
      for (int64_t j = 0; j < K; ++j) w[j] = (a.renormalize ? w[j] / total : w[j]) * a.routed_scaling;
    }
  };
  LaunchBlocks(BlocksFor(a.tokens, E * 16 * static_cast<int64_t>(sizeof(float)), rt), rt, body);
}

inline void moe_route(const OmniMoeRouteArgs* a, const OmniRuntime* rt) {
  if (a->tokens <= 0) return;
  OMNI_DISPATCH_FLOAT(a->dtype, T, RouteRun<T>(*a, rt));
}

// ---- dispatch: counting sort of pairs by expert (stable), then a parallel row gather ---------------------
inline void moe_dispatch(const OmniMoeDispatchArgs* ap, const OmniRuntime* rt) {
  const OmniMoeDispatchArgs& a = *ap;
  const int64_t E = a.num_experts, P = a.tokens * a.top_k, bs = a.block_size;
  int32_t* counts = a.expert_counts;
  int64_t* off = a.expert_offsets;
  for (int64_t e = 0; e < E; ++e) counts[e] = 0;
  for (int64_t p = 0; p < P; ++p) ++counts[a.topk_ids[p]];
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + AlignUp(counts[e], bs);
  for (int64_t r = 0; r < a.rows; ++r) a.sorted_token_ids[r] = -1;
  // Insertion cursors: expert e's next row is off[e] + (number of its pairs placed so far).
  for (int64_t e = 0; e < E; ++e) counts[e] = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int32_t e = a.topk_ids[p];
    const int64_t r = off[e] + counts[e]++;
    a.inverse_index[p] = static_cast<int32_t>(r);
    a.sorted_token_ids[r] = static_cast<int32_t>(p / a.top_k);
  }
  const int64_t es = a.dtype == OMNI_F32 ? 4 : 2, H = a.hidden_size;
  const unsigned char* x = static_cast<const unsigned char*>(a.hidden);
  unsigned char* dst = static_cast<unsigned char*>(a.x_sorted);
  auto body = [&]() {
    int64_t r0, r1;
    BlockRange(a.rows, GetBlockIdx(), GetBlockNum(), &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t t = a.sorted_token_ids[r];
      if (t >= 0) {
        std::memcpy(dst + r * H * es, x + t * a.hidden_stride * es, static_cast<size_t>(H * es));
      } else {
        std::memset(dst + r * H * es, 0, static_cast<size_t>(H * es));
      }
    }
  };
  LaunchBlocks(BlocksFor(a.rows, 2 * H * es, rt), rt, body);
}

// ---- grouped GEMM: items (expert, 32 output columns, 48 rows) ----------------------------------------------
template <typename T>
void GroupedGemmRun(const OmniGroupedGemmArgs& a, const OmniRuntime* rt) {
  const int64_t E = a.num_experts, N = a.n_dim, K = a.k_dim;
  const int64_t* off = a.expert_offsets;
  T* out = static_cast<T*>(a.out);
  // Rows that belong to no expert are zero.
  auto zero_rows = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memset(out + r * a.out_stride, 0, static_cast<size_t>(N) * sizeof(T));
  };
  zero_rows(0, off[0]);
  zero_rows(off[E], a.rows);
  // Item prefix sums live on the heap: E is bounded only by the bindings' checks.
  int64_t* prefix = static_cast<int64_t*>(std::malloc(static_cast<size_t>(E + 1) * sizeof(int64_t)));
  if (prefix == nullptr) return;
  ItemPrefix(off, E, kMB, CeilDiv(N, kNT), prefix);
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);
  const ItemMap map{prefix, E};
  const bool panels = a.w_layout == OMNI_W_PANELS_F32;  // fp32: w is [E, ceil(N / 32), K, 32]
  auto item = [&](int64_t it) {
    const RowItem r = SplitRowItem(map, off, it);
    const int64_t n0 = r.tile * kNT;
    const T* we = w + r.e * N * K;
    auto x_row = [&](int64_t row) { return x + row * a.x_stride; };
    auto w_row = [&](int64_t n) { return MatrixRow(we, n0 + n, N, K); };
    ExpertTile<T, T> tile;
    alignas(64) float panel_c[kMB * kNT];
    const float* C = panels ? PanelItem(r, x_row, w, CeilDiv(N, kNT), K, panel_c)
                            : ItemProduct(tile, r, x_row, w_row, K);
    const int64_t nn = std::min<int64_t>(kNT, N - n0);
    for (int64_t m = 0; m < r.mb; ++m) {
      T* o = out + (r.r0 + m) * a.out_stride + n0;
      for (int64_t n = 0; n < nn; ++n) o[n] = FromFloat<T>(C[m * kNT + n]);
    }
  };
  RunItems(prefix[E], kNT * K * static_cast<int64_t>(sizeof(T)), rt, item);
  std::free(prefix);
}

inline void grouped_gemm(const OmniGroupedGemmArgs* a, const OmniRuntime* rt) {
  if (a->rows <= 0 || a->n_dim <= 0) return;
  OMNI_DISPATCH_FLOAT(a->dtype, T, GroupedGemmRun<T>(*a, rt));
}

// ---- combine: out[t] = T(sum_j w[t, j] * expert_out[inv[t, j]]), fp32 accumulation (combine.h) ----------------
template <typename T>
void CombineRun(const OmniMoeCombineArgs& a, const OmniRuntime* rt) {
  const T* y = static_cast<const T*>(a.expert_out);
  CombineTokens<T, false>(a, a.inverse_index, [&](int32_t r) { return y + static_cast<int64_t>(r) * a.expert_out_stride; },
                          a.hidden_size * (a.top_k + 1) * static_cast<int64_t>(sizeof(T)), rt);
}

inline void moe_combine(const OmniMoeCombineArgs* a, const OmniRuntime* rt) {
  if (a->tokens <= 0 || a->hidden_size <= 0) return;
  OMNI_DISPATCH_FLOAT(a->dtype, T, CombineRun<T>(*a, rt));
}

}  // namespace moe
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
