// Fused MoE block: route -> gate/up GEMM + silu_and_mul -> down GEMM -> weighted combine.
//
//   1. Route (one thread, O(T*k)): counting sort of the (token, slot) pairs by local expert (expert_map
//      applied; pairs of experts not on this rank are dropped) -> per-expert row offsets, the token of every
//      sorted row, and each pair's row (the inverse index, -1 when dropped).
//   2. Gate/up: items (expert, 16 act columns = 16 gate + 16 up weight rows, up to 48 tokens). The tile
//      computes gate and up for the item's tokens, then act = T(silu(gate) * up) into the act buffer.
//   3. Down: items (expert, 32 output columns, up to 48 tokens): y = act . W2^T into an fp32 buffer.
//   4. Combine, per token: out = T(sum_j w_j * y[row(t, j)]).
// Items are pulled dynamically by both cores; the weights of a (expert, tile) are read from memory once per
// 48 tokens of that expert, i.e. exactly once at decode sizes, and no dense [T, E, ...] tensor exists.
#pragma once
#include <algorithm>

#include "host/simd.h"
#include "kernels/moe/expert_gemm.h"
#include "omni/ops/moe.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace moe {

// Workspace carve-up (every part 64-byte aligned).
// With tiled weights the A operands (gathered tokens xs, activations act) are staged blocked for the tiles
// (see amx_tiles.h): every expert's rows padded to 16, K to 32 (act_ld, xs_ld); `padded` holds the experts'
// padded row offsets.
struct FusedMoeLayout {
  int64_t offsets, items1, items2, pair_row, row_token, act, ybuf, xs, padded, act_ld, xs_ld, total;
  FusedMoeLayout(const OmniFusedMoeArgs& a, int64_t elem_size) {
    const int64_t E = a.num_experts, P = a.tokens * a.top_k;
    const bool tiles = a.w_layout == OMNI_W_TILES_BF16;
    const int64_t arows = tiles ? P + 15 * std::min(E, P) : P;
    act_ld = tiles ? AlignUp(a.inter_size, 32) : a.inter_size;
    xs_ld = tiles ? AlignUp(a.hidden_size, 32) : 0;
    int64_t at = 0;
    auto take = [&at](int64_t bytes) {
      int64_t p = at;
      at += AlignUp(bytes, 64);
      return p;
    };
    offsets = take((E + 1) * 8);
    items1 = take((E + 1) * 8);
    items2 = take((E + 1) * 8);
    pair_row = take(P * 4);
    row_token = take(P * 4);
    act = take(arows * act_ld * elem_size);
    ybuf = take(P * a.hidden_size * 4);
    xs = take(arows * xs_ld * elem_size);
    padded = take((E + 1) * 8);
    total = at;
  }
};

// Step 1 of the block: counting sort of the (token, slot) pairs by local expert (stable in pair order). Fills
// offsets [E + 1], pair_row [P] (-1: expert not on this rank) and row_token [P]; cursor [E] is scratch.
inline void RouteSort(const OmniFusedMoeArgs& a, int64_t* offsets, int32_t* pair_row, int32_t* row_token,
                      int64_t* cursor) {
  const int64_t E = a.num_experts, K = a.top_k, P = a.tokens * a.top_k;
  for (int64_t e = 0; e <= E; ++e) offsets[e] = 0;
  for (int64_t p = 0; p < P; ++p) {
    int32_t e = a.topk_ids[p];
    if (a.expert_map != nullptr) e = a.expert_map[e];
    pair_row[p] = e;  // the local expert for now
    if (e >= 0) ++offsets[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  for (int64_t e = 0; e < E; ++e) cursor[e] = offsets[e];
  for (int64_t p = 0; p < P; ++p) {
    const int32_t e = pair_row[p];
    if (e < 0) {
      pair_row[p] = -1;
      continue;
    }
    const int64_t r = cursor[e]++;
    pair_row[p] = static_cast<int32_t>(r);
    row_token[r] = static_cast<int32_t>(p / K);
  }
}

// Step 4: out[t] = T(sum_j w_j * y[row(t, j)]) from the fp32 expert outputs ybuf [P, H].
template <typename T>
void CombinePairs(const OmniFusedMoeArgs& a, const int32_t* pair_row, const float* ybuf, const OmniRuntime* rt) {
  const int64_t T_ = a.tokens, K = a.top_k, H = a.hidden_size;
  T* out = static_cast<T*>(a.out);
  auto body = [&]() {
    int64_t t0, t1;
    BlockRange(T_, GetBlockIdx(), GetBlockNum(), &t0, &t1);
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
          const int32_t r = pair_row[t * K + j];
          if (r < 0) continue;
          const float w = a.topk_weights[t * K + j];
          const float* y = ybuf + static_cast<int64_t>(r) * H + h0;
          for (int64_t i = 0; i < n; ++i) acc[i] += w * y[i];
        }
        T* o = out + t * a.out_stride + h0;
        int64_t i = 0;
        for (; i + simd::kW <= n; i += simd::kW) simd::Store(o + i, simd::LoadW(acc + i));  // one rounding, vectorised
        for (; i < n; ++i) o[i] = FromFloat<T>(acc[i]);
      }
    }
  };
  LaunchBlocks(BlocksFor(T_, H * (K + 1) * 4, rt), rt, body);
}

inline int64_t DTypeSize(int32_t dt) { return dt == OMNI_F32 ? 4 : 2; }

template <typename T>
void FusedMoeRun(const OmniFusedMoeArgs& a, const OmniRuntime* rt) {
  const FusedMoeLayout L(a, sizeof(T));
  unsigned char* ws = static_cast<unsigned char*>(a.workspace);
  int64_t* offsets = reinterpret_cast<int64_t*>(ws + L.offsets);
  int64_t* items1 = reinterpret_cast<int64_t*>(ws + L.items1);
  int64_t* items2 = reinterpret_cast<int64_t*>(ws + L.items2);
  int32_t* pair_row = reinterpret_cast<int32_t*>(ws + L.pair_row);
  int32_t* row_token = reinterpret_cast<int32_t*>(ws + L.row_token);
  T* act = reinterpret_cast<T*>(ws + L.act);
  float* ybuf = reinterpret_cast<float*>(ws + L.ybuf);
  const int64_t E = a.num_experts, H = a.hidden_size, I = a.inter_size;

  // ---- 1. route: counting sort by local expert (items1 as the fill cursor) ----
  RouteSort(a, offsets, pair_row, row_token, items1);
  const int64_t tiles1 = CeilDiv(I, kNT / 2), tiles2 = CeilDiv(H, kNT);
  items1[0] = items2[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t blocks = CeilDiv(offsets[e + 1] - offsets[e], kMB);
    items1[e + 1] = items1[e] + blocks * tiles1;
    items2[e + 1] = items2[e] + blocks * tiles2;
  }
  const T* x = static_cast<const T*>(a.hidden);
  const T* w13 = static_cast<const T*>(a.w13);
  const T* w2 = static_cast<const T*>(a.w2);

  // ---- 2. gate/up + silu_and_mul ----
  {
    const ItemMap map{items1, E};
    auto item = [&](int64_t it) {
      const int64_t e = map.Expert(it);
      const int64_t local = it - items1[e];
      const int64_t blocks = CeilDiv(offsets[e + 1] - offsets[e], kMB);
      const int64_t i0 = (local / blocks) * (kNT / 2);
      const int64_t r0 = offsets[e] + (local % blocks) * kMB;
      const int64_t mb = std::min<int64_t>(kMB, offsets[e + 1] - r0);
      const T* a_rows[kMB];
      const T* w_rows[kNT];
      for (int64_t m = 0; m < mb; ++m) a_rows[m] = x + row_token[r0 + m] * a.hidden_stride;
      const T* we = w13 + e * 2 * I * H;
      for (int64_t n = 0; n < kNT / 2; ++n) {
        const bool ok = i0 + n < I;
        w_rows[n] = ok ? we + (i0 + n) * H : nullptr;
        w_rows[kNT / 2 + n] = ok ? we + (I + i0 + n) * H : nullptr;
      }
      ExpertTile<T, T> t;
      const float* C = t.Compute(a_rows, mb, w_rows, H);
      const int64_t ni = std::min<int64_t>(kNT / 2, I - i0);
      for (int64_t m = 0; m < mb; ++m) {
        const float* c = C + m * kNT;
        T* dst = act + (r0 + m) * I + i0;
        for (int64_t i = 0; i < ni; ++i) {
          const float g = c[i];
          dst[i] = FromFloat<T>(g / (1.0f + VecExpF(-g)) * c[kNT / 2 + i]);
        }
      }
    };
    RunItems(items1[E], kNT * H * static_cast<int64_t>(sizeof(T)), rt, item);
  }

  // ---- 3. down projection into the fp32 y buffer ----
  {
    const ItemMap map{items2, E};
    auto item = [&](int64_t it) {
      const int64_t e = map.Expert(it);
      const int64_t local = it - items2[e];
      const int64_t blocks = CeilDiv(offsets[e + 1] - offsets[e], kMB);
      const int64_t h0 = (local / blocks) * kNT;
      const int64_t r0 = offsets[e] + (local % blocks) * kMB;
      const int64_t mb = std::min<int64_t>(kMB, offsets[e + 1] - r0);
      const T* a_rows[kMB];
      const T* w_rows[kNT];
      for (int64_t m = 0; m < mb; ++m) a_rows[m] = act + (r0 + m) * I;
      const T* we = w2 + e * H * I;
      for (int64_t n = 0; n < kNT; ++n) w_rows[n] = h0 + n < H ? we + (h0 + n) * I : nullptr;
      ExpertTile<T, T> t;
      const float* C = t.Compute(a_rows, mb, w_rows, I);
      const int64_t nh = std::min<int64_t>(kNT, H - h0);
      for (int64_t m = 0; m < mb; ++m) std::memcpy(ybuf + (r0 + m) * H + h0, C + m * kNT, nh * sizeof(float));
    };
    RunItems(items2[E], kNT * I * static_cast<int64_t>(sizeof(T)), rt, item);
  }

  // ---- 4. weighted combine per token ----
  CombinePairs<T>(a, pair_row, ybuf, rt);
}

inline int64_t fused_moe_workspace(const OmniFusedMoeArgs* a) {
  return FusedMoeLayout(*a, DTypeSize(a->dtype)).total;
}

inline void fused_moe(const OmniFusedMoeArgs* a, const OmniRuntime* rt) {
  if (a->tokens <= 0) return;
  OMNI_DISPATCH_FLOAT(a->dtype, T, FusedMoeRun<T>(*a, rt));
}

}  // namespace moe
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
