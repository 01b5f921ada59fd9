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

#include "kernels/moe/combine.h"
#include "kernels/moe/expert_gemm.h"
#include "kernels/moe/panel_gemm.h"
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

// The workspace parts as typed pointers; A: the element type of the staged activations (act, xs).
template <typename A>
struct FusedMoeParts {
  int64_t *offsets, *items1, *items2, *padded;
  int32_t *pair_row, *row_token;
  A *act, *xs;
  float* ybuf;
  FusedMoeParts(const FusedMoeLayout& L, void* workspace) {
    unsigned char* ws = static_cast<unsigned char*>(workspace);
    offsets = reinterpret_cast<int64_t*>(ws + L.offsets);
    items1 = reinterpret_cast<int64_t*>(ws + L.items1);
    items2 = reinterpret_cast<int64_t*>(ws + L.items2);
    padded = reinterpret_cast<int64_t*>(ws + L.padded);
    pair_row = reinterpret_cast<int32_t*>(ws + L.pair_row);
    row_token = reinterpret_cast<int32_t*>(ws + L.row_token);
    act = reinterpret_cast<A*>(ws + L.act);
    xs = reinterpret_cast<A*>(ws + L.xs);
    ybuf = reinterpret_cast<float*>(ws + L.ybuf);
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

// Step 4: out[t] = T(sum_j w_j * y[row(t, j)]) from the fp32 expert outputs ybuf [P, H] (combine.h), rounded with
// vector stores.
template <typename T>
void CombinePairs(const OmniFusedMoeArgs& a, const int32_t* pair_row, const float* ybuf, const OmniRuntime* rt) {
  const int64_t H = a.hidden_size;
  CombineTokens<T, true>(a, pair_row, [&](int32_t r) { return ybuf + static_cast<int64_t>(r) * H; },
                         H * (a.top_k + 1) * 4, rt);
}

inline int64_t DTypeSize(int32_t dt) { return dt == OMNI_F32 ? 4 : 2; }

template <typename T>
void FusedMoeRun(const OmniFusedMoeArgs& a, const OmniRuntime* rt) {
  const FusedMoeParts<T> p(FusedMoeLayout(a, sizeof(T)), a.workspace);
  const int64_t E = a.num_experts, H = a.hidden_size, I = a.inter_size;

  // ---- 1. route: counting sort by local expert (items1 as the fill cursor) ----
  RouteSort(a, p.offsets, p.pair_row, p.row_token, p.items1);
  ItemPrefix(p.offsets, E, kMB, CeilDiv(I, kNT / 2), p.items1);
  ItemPrefix(p.offsets, E, kMB, CeilDiv(H, kNT), p.items2);
  const T* x = static_cast<const T*>(a.hidden);
  const T* w13 = static_cast<const T*>(a.w13);
  const T* w2 = static_cast<const T*>(a.w2);
  // fp32 weights prepacked into panels (OMNI_W_PANELS_F32): w13 as ceil(I / 16) panels [H][16 gate | 16 up] per
  // expert, w2 as ceil(H / 32) panels [I][32]; the items and the C tiles are the same as on the rows.
  const bool panels = a.w_layout == OMNI_W_PANELS_F32;

  // ---- 2. gate/up + silu_and_mul: the item's kNT weight rows are kNT / 2 gate rows, then the same up rows ----
  {
    const ItemMap map{p.items1, E};
    auto item = [&](int64_t it) {
      const RowItem r = SplitRowItem(map, p.offsets, it);
      const int64_t i0 = r.tile * (kNT / 2);
      const T* gate = w13 + r.e * 2 * I * H;
      const T* up = gate + I * H;
      auto x_row = [&](int64_t row) { return x + p.row_token[row] * a.hidden_stride; };
      auto w_row = [&](int64_t n) {
        return n < kNT / 2 ? MatrixRow(gate, i0 + n, I, H) : MatrixRow(up, i0 + n - kNT / 2, I, H);
      };
      ExpertTile<T, T> tile;
      alignas(64) float panel_c[kMB * kNT];
      const float* C = panels ? PanelItem(r, x_row, w13, CeilDiv(I, kNT / 2), H, panel_c)
                              : ItemProduct(tile, r, x_row, w_row, H);
      const int64_t ni = std::min<int64_t>(kNT / 2, I - i0);
      for (int64_t m = 0; m < r.mb; ++m) {
        const float* c = C + m * kNT;
        T* dst = p.act + (r.r0 + m) * I + i0;
        for (int64_t i = 0; i < ni; ++i) {
          const float g = c[i];
          dst[i] = FromFloat<T>(g / (1.0f + VecExpF(-g)) * c[kNT / 2 + i]);
        }
      }
    };
    RunItems(p.items1[E], kNT * H * static_cast<int64_t>(sizeof(T)), rt, item);
  }

  // ---- 3. down projection into the fp32 y buffer ----
  {
    const ItemMap map{p.items2, E};
    auto item = [&](int64_t it) {
      const RowItem r = SplitRowItem(map, p.offsets, it);
      const int64_t h0 = r.tile * kNT;
      const T* we = w2 + r.e * H * I;
      auto act_row = [&](int64_t row) { return p.act + row * I; };
      auto w_row = [&](int64_t n) { return MatrixRow(we, h0 + n, H, I); };
      ExpertTile<T, T> tile;
      alignas(64) float panel_c[kMB * kNT];
      const float* C = panels ? PanelItem(r, act_row, w2, CeilDiv(H, kNT), I, panel_c)
                              : ItemProduct(tile, r, act_row, w_row, I);
      const int64_t nh = std::min<int64_t>(kNT, H - h0);
      for (int64_t m = 0; m < r.mb; ++m) std::memcpy(p.ybuf + (r.r0 + m) * H + h0, C + m * kNT, nh * sizeof(float));
    };
    RunItems(p.items2[E], kNT * I * static_cast<int64_t>(sizeof(T)), rt, item);
  }

  // ---- 4. weighted combine per token ----
  CombinePairs<T>(a, p.pair_row, p.ybuf, rt);
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
