// The launches of the paged-attention kernel (paged_attention.h): decode items (sequence, kv head, key split)
// and their split combine, varlen prefill items (sequence, kv head, head chunk, query tile), and on the amx
// library the routes to the AMX paths: decode-shaped items (amx_attention.h) and bf16 prefill (amx_prefill.h).
#pragma once
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/attention/amx_attention.h"
#include "kernels/attention/amx_prefill.h"
#include "kernels/attention/dot_decode.h"
#include "kernels/attention/lane_decode.h"
#include "kernels/attention/paged_attention.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
using namespace AscendC;

namespace attn {

template <typename T>
KeySource<T> MakeSource(const OmniPagedAttnArgs& a, int64_t b, int64_t kvh) {
  KeySource<T> src;
  if (a.k_cache != nullptr) {
    src.kc = static_cast<const T*>(a.k_cache) + kvh * a.k_head_stride;
    src.vc = static_cast<const T*>(a.v_cache) + kvh * a.v_head_stride;
    src.kbs = a.k_block_stride;
    src.kts = a.k_token_stride;
    src.vbs = a.v_block_stride;
    src.vts = a.v_token_stride;
    src.bs = a.block_size;
    src.table = a.block_table + b * a.table_stride;
    src.ctx = a.ctx_lens != nullptr ? a.ctx_lens[b] : 0;
  }
  if (a.cu_seqlens != nullptr) {
    const int64_t t0 = a.cu_seqlens[b];
    src.kn = static_cast<const T*>(a.k) + t0 * a.kn_token_stride + kvh * a.kn_head_stride;
    src.vn = static_cast<const T*>(a.v) + t0 * a.vn_token_stride + kvh * a.vn_head_stride;
    src.knts = a.kn_token_stride;
    src.vnts = a.vn_token_stride;
  }
  return src;
}

inline bool SharedKV(const OmniPagedAttnArgs& a) {
  // MLA: V is the first v_dim columns of the K rows.
  return a.cu_seqlens == nullptr && a.k_cache == a.v_cache && a.k_block_stride == a.v_block_stride &&
         a.k_token_stride == a.v_token_stride && a.k_head_stride == a.v_head_stride && a.v_dim <= a.head_dim;
}

template <typename T>
void LoadQ(float* dst, const T* src, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = ToFloat(src[i]) * scale;
}

// Whether items of `rows` query rows at one position go to the AMX path (amx_attention.h): bf16 on the amx
// library, no soft cap, no mask.
inline bool AmxRowsFit(const OmniPagedAttnArgs& a, int64_t rows) {
  return kHaveAmxAttention && a.dtype == OMNI_BF16 && a.soft_cap <= 0.0f &&
         (a.mask == nullptr || a.mask_kind == OMNI_MASK_NONE) && a.kv_heads <= kMaxAmxHeads &&
         AmxAttentionFits(rows, a.head_dim, a.v_dim);
}
template <typename T>
bool UseAmxRows(const OmniPagedAttnArgs& a, int64_t rows) {
  return std::is_same_v<T, bfloat16_t> && AmxRowsFit(a, rows);
}

// Whether decode items of G fp32 rows per kv head go to the lanes path (lane_decode.h): AVX-512, no soft cap,
// no mask.
template <typename T>
bool UseLaneRows(const OmniPagedAttnArgs& a, int64_t G) {
  return kHaveLaneDecode && std::is_same_v<T, float> && a.soft_cap <= 0.0f &&
         (a.mask == nullptr || a.mask_kind == OMNI_MASK_NONE) && a.kv_heads <= kMaxAmxHeads &&
         LaneDecodeFits(G, a.head_dim, a.v_dim);
}

// kv heads per AMX item: as many as leave at least two items per core (units = items per kv head).
inline int64_t HeadsPerItem(int64_t units, int64_t kv_heads, int64_t cores, int64_t max_heads = kMaxAmxHeads) {
  int64_t hpi = kv_heads;
  while (hpi > 1 && (hpi > max_heads || units * (kv_heads / hpi) < 2 * cores)) {
    --hpi;
    while (kv_heads % hpi != 0) --hpi;
  }
  return hpi;
}

// One AMX item: kv heads [kvh, kvh + hpi) of sequence b over keys [lo, hi); q0 = query row kvh * G.
template <typename T>
void AmxItem(const OmniPagedAttnArgs& a, int64_t b, int64_t kvh, int64_t hpi, int64_t lo, int64_t hi, const T* q0,
             float* o, float* m, float* l) {
  KeySource<T> srcs[kMaxAmxHeads];
  for (int64_t h = 0; h < hpi; ++h) srcs[h] = MakeSource<T>(a, b, kvh + h);
  AmxSharedKeys(srcs, hpi, a.q_heads / a.kv_heads, lo, hi, reinterpret_cast<const uint16_t*>(q0), a.q_head_stride,
                a.head_dim, a.v_dim, a.scale, o, m, l);
}

// One lanes or dot item (fp32): kv heads [kvh, kvh + hpi) of sequence b over keys [lo, hi); q0 = query row kvh * G.
template <typename T>
void LaneItem(const OmniPagedAttnArgs& a, int64_t b, int64_t kvh, int64_t hpi, int64_t lo, int64_t hi, const T* q0,
              float* o, float* m, float* l) {
  if constexpr (std::is_same_v<T, float>) {
    KeySource<T> srcs[kMaxAmxHeads];
    for (int64_t h = 0; h < hpi; ++h) srcs[h] = MakeSource<T>(a, b, kvh + h);
    const int64_t G = a.q_heads / a.kv_heads;
    // few rows per kv head: the dot form (dot_decode.h); more: one row per lane
    const auto item = DotDecodeFits(G, a.head_dim, a.v_dim) ? DotSharedKeys<KeySource<T>> : LaneSharedKeys<KeySource<T>>;
    item(srcs, hpi, G, lo, hi, SharedKV(a), q0, a.q_head_stride, a.head_dim, a.v_dim, a.scale, o, m, l);
  }
}

template <typename T>
void Decode(const OmniPagedAttnArgs* ap, const OmniRuntime* rt) {
  const OmniPagedAttnArgs& a = *ap;
  const int64_t G = a.q_heads / a.kv_heads, S = a.num_splits, D = a.head_dim, Dv = a.v_dim;
  const bool shared = SharedKV(a);
  const bool amx = UseAmxRows<T>(a, G), lanes = !amx && UseLaneRows<T>(a, G);
  // The AMX and lanes paths take several kv heads per item (their cache rows are adjacent: sequential reads).
  const int64_t hpi = amx || lanes ? HeadsPerItem(a.batch * S, a.kv_heads, rt->num_cores) : 1;
  const int64_t groups = a.kv_heads / hpi;
  const int64_t items = a.batch * groups * S;
  auto body = [&]() {
    KernelPagedAttention<T> k(a, shared, 0);
    int64_t begin, end;
    BlockRange(items, GetBlockIdx(), GetBlockNum(), &begin, &end);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t s = it % S, kvh = (it / S) % groups * hpi, b = it / (S * groups);
      // State rows of this item: workspace rows ((b * S + s) * Hq + kvh * G + g), stored as q | o | m, l blocks.
      const int64_t row0 = (b * S + s) * a.q_heads + kvh * G;
      float* q = a.workspace + row0 * D;
      const int64_t total_rows = a.batch * S * a.q_heads;
      float* o = a.workspace + total_rows * D + row0 * Dv;
      float* m = a.workspace + total_rows * (D + Dv) + row0;
      float* l = a.workspace + total_rows * (D + Dv + 1) + row0;
      const T* qsrc = static_cast<const T*>(a.q) + b * a.q_token_stride + kvh * G * a.q_head_stride;
      for (int64_t g = 0; g < hpi * G; ++g) {
        if (!amx && !lanes) LoadQ(q + g * D, qsrc + g * a.q_head_stride, D, a.scale);
        std::memset(o + g * Dv, 0, Dv * 4);
        m[g] = kNegInf;
        l[g] = 0.0f;
      }
      const int64_t n = a.ctx_lens[b];
      int64_t lo = a.window > 0 ? std::max<int64_t>(0, n - a.window) : 0;
      lo = std::max(lo, s * a.split_len);
      const int64_t hi = std::min(n, (s + 1) * a.split_len);
      if (amx || lanes) {
        if (hi > lo && amx) AmxItem(a, b, kvh, hpi, lo, hi, qsrc, o, m, l);
        if (hi > lo && lanes) LaneItem(a, b, kvh, hpi, lo, hi, qsrc, o, m, l);
        continue;
      }
      k.Attend(MakeSource<T>(a, b, kvh), lo, hi, static_cast<int>(G), 1, n - 1, false, q, o, m, l,
               MakeMask(a, b, 0, kvh * G, G));
    }
  };
  LaunchBlocks(std::min<int64_t>(items, rt->num_cores), rt, body);

  // Combine the splits: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
  const int64_t total_rows = a.batch * S * a.q_heads;
  const float* o_all = a.workspace + total_rows * D;
  const float* m_all = a.workspace + total_rows * (D + Dv);
  const float* l_all = a.workspace + total_rows * (D + Dv + 1);
  const int64_t out_rows = a.batch * a.q_heads;
  auto combine = [&]() {
    int64_t begin, end;
    BlockRange(out_rows, GetBlockIdx(), GetBlockNum(), &begin, &end);
    TPipe pipe;
    TBuf<TPosition::VECCALC> acc_buf;
    pipe.InitBuffer(acc_buf, static_cast<uint32_t>(Dv * 4));
    float* acc = acc_buf.Get<float>().GetPhyAddr();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / a.q_heads, h = r % a.q_heads;
      float M = kNegInf;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t w = (b * S + s) * a.q_heads + h;
        if (l_all[w] > 0.0f) M = std::max(M, m_all[w]);
      }
      float L = 0.0f;
      std::memset(acc, 0, Dv * 4);
      if (M != kNegInf) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t w = (b * S + s) * a.q_heads + h;
          if (!(l_all[w] > 0.0f)) continue;
          const float f = VecExpF(m_all[w] - M);
          L += f * l_all[w];
          const float* os = o_all + w * Dv;
          for (int64_t d = 0; d < Dv; ++d) acc[d] += f * os[d];
        }
      }
      const float inv = L > 0.0f ? 1.0f / L : 0.0f;
      T* dst = static_cast<T*>(a.out) + b * a.out_token_stride + h * a.out_head_stride;
      for (int64_t d = 0; d < Dv; ++d) dst[d] = FromFloat<T>(acc[d] * inv);
    }
  };
  LaunchBlocks(BlocksFor(out_rows, Dv * 4 * (S + 1), rt), rt, combine);
}

// Rows of a prefill item that fit the UB next to the key tiles.
inline int64_t PrefillStateRows(int64_t D, int64_t Dv) {
  const int64_t tiles = (2 * kKC * D + kKC * Dv + kRB * kKC + kRB) * 4 + 4096;
  const int64_t rows = (static_cast<int64_t>(kUBSize) - tiles) / ((D + Dv + 2) * 4);
  return std::max<int64_t>(1, std::min<int64_t>(rows, kRB));
}

// out[t0 + j, h0 + g] = o[j * hn + g] / l[j * hn + g] for ntok tokens x hn heads.
template <typename T>
void WriteRows(const OmniPagedAttnArgs& a, int64_t t0, int64_t h0, int64_t ntok, int64_t hn, const float* o,
               const float* l) {
  const int64_t Dv = a.v_dim;
  for (int64_t j = 0; j < ntok; ++j) {
    for (int64_t g = 0; g < hn; ++g) {
      const int64_t r = j * hn + g;
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      T* dst = static_cast<T*>(a.out) + (t0 + j) * a.out_token_stride + (h0 + g) * a.out_head_stride;
      const float* os = o + r * Dv;
      for (int64_t d = 0; d < Dv; ++d) dst[d] = FromFloat<T>(os[d] * inv);
    }
  }
}

// bf16 varlen steps on the amx library: every sequence of more than one token in AMX query tiles over its
// packed keys (amx_prefill.h), the one-token ones as AMX decode items; no soft cap, no mask.
template <typename T>
bool UseAmxPrefill(const OmniPagedAttnArgs& a) {
  // the one-token rows' AMX decode items take at most 16 rows a kv head (larger groups become query tiles)
  return kHaveAmxPrefill && UseAmxRows<T>(a, std::min<int64_t>(a.q_heads / a.kv_heads, 16)) &&
         AmxPrefillFits(a.q_heads / a.kv_heads, a.head_dim, a.v_dim);
}

template <typename T>
void AmxPrefill(const OmniPagedAttnArgs& a, const OmniRuntime* rt) {
  const int64_t G = a.q_heads / a.kv_heads, D = a.head_dim, Dv = a.v_dim, H = a.kv_heads;
  const int64_t mq = std::max<int64_t>(1, kPfRows / G);  // positions per query tile
  auto len_of = [&](int64_t b) { return a.cu_seqlens[b + 1] - a.cu_seqlens[b]; };
  auto ctx_of = [&](int64_t b) { return (a.k_cache != nullptr && a.ctx_lens != nullptr) ? a.ctx_lens[b] : 0; };
  const bool one_row_fits = G <= 16;  // AmxSharedKeys takes <= 16 rows per kv head

  // 1. pack the keys of every (sequence of > 1 token, kv head) once: every query tile of it reads them
  thread_local std::vector<int64_t> pack_off;
  thread_local std::vector<uint16_t> pack;
  pack_off.assign(static_cast<size_t>(a.batch + 1), 0);
  std::vector<int64_t> units;  // b * H + kvh
  for (int64_t b = 0; b < a.batch; ++b) {
    const bool tiled = len_of(b) > 1 || !one_row_fits;
    pack_off[b + 1] = pack_off[b] + (tiled ? PackedKeyElems(ctx_of(b) + len_of(b), D, Dv) * H : 0);
    if (tiled && len_of(b) > 0)
      for (int64_t h = 0; h < H; ++h) units.push_back(b * H + h);
  }
  pack.resize(static_cast<size_t>(pack_off[a.batch]));
  // thread_locals are not captured: the launched lambdas must see the calling thread's buffers by pointer
  uint16_t* packed = pack.data();
  const int64_t* off = pack_off.data();
  auto pack_body = [&]() {
    int64_t begin, end;
    BlockRange(static_cast<int64_t>(units.size()), GetBlockIdx(), GetBlockNum(), &begin, &end);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = units[u] / H, kvh = units[u] % H, keys = ctx_of(b) + len_of(b);
      PackKeys(MakeSource<T>(a, b, kvh), keys, D, Dv, packed + off[b] + kvh * PackedKeyElems(keys, D, Dv));
    }
  };
  if (!units.empty()) LaunchBlocks(BlocksFor(static_cast<int64_t>(units.size()), 4096, rt), rt, pack_body);

  // 2. items, costliest first: (b, kvh, first position j0) query tiles, (b, kv head group, -1) one-token rows
  struct Item {
    int64_t b, kvh, j0, cost;
  };
  std::vector<Item> items;
  int64_t decode_rows = 0;
  for (int64_t b = 0; b < a.batch; ++b) decode_rows += len_of(b) == 1 && one_row_fits;
  const int64_t hpi = HeadsPerItem(decode_rows, H, rt->num_cores);
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t len = len_of(b), ctx = ctx_of(b);
    if (len == 1 && one_row_fits) {
      for (int64_t h = 0; h < H; h += hpi) items.push_back({b, h, -1, (ctx + 1) * hpi * G});
      continue;
    }
    for (int64_t j0 = 0; j0 < len; j0 += mq) {
      const int64_t ntok = std::min(mq, len - j0), keys = a.causal ? ctx + j0 + ntok : ctx + len;
      for (int64_t h = 0; h < H; ++h) items.push_back({b, h, j0, keys * ntok * G});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  auto body = [&]() {
    thread_local std::vector<float> state;
    const int64_t rows = std::max(AlignUp(mq * G, 16), hpi * G);
    state.resize(static_cast<size_t>(rows * (Dv + 2)));
    float* o = state.data();
    float* m = o + rows * Dv;
    float* l = m + rows;
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n_items;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      const Item& it = items[i];
      const int64_t t0 = a.cu_seqlens[it.b], ctx = ctx_of(it.b), len = len_of(it.b);
      const T* q0 = static_cast<const T*>(a.q) + t0 * a.q_token_stride + it.kvh * G * a.q_head_stride;
      if (it.j0 < 0) {
        AmxItem(a, it.b, it.kvh, hpi, 0, ctx + 1, q0, o, m, l);
        WriteRows<T>(a, t0, it.kvh * G, 1, hpi * G, o, l);
        continue;
      }
      const int64_t ntok = std::min(mq, len - it.j0), keys = ctx + len;
      AmxPrefillTile(reinterpret_cast<const uint16_t*>(q0 + it.j0 * a.q_token_stride), a.q_token_stride,
                     a.q_head_stride, ntok, G, ctx + it.j0, a.causal != 0, keys,
                     packed + off[it.b] + it.kvh * PackedKeyElems(keys, D, Dv), D, Dv, a.scale, o, l);
      WriteRows<T>(a, t0 + it.j0, it.kvh * G, ntok, G, o, l);
    }
  };
  LaunchBlocks(std::min<int64_t>(n_items, rt->num_cores), rt, body);
}

template <typename T>
void Prefill(const OmniPagedAttnArgs* ap, const OmniRuntime* rt) {
  const OmniPagedAttnArgs& a = *ap;
  if (UseAmxPrefill<T>(a)) return AmxPrefill<T>(a, rt);
  const int64_t G = a.q_heads / a.kv_heads, D = a.head_dim, Dv = a.v_dim;
  const int64_t max_rows = PrefillStateRows(D, Dv);
  const int64_t hc = std::min(G, max_rows);           // heads per item
  const int64_t nhc = (G + hc - 1) / hc;
  const int64_t mq = std::max<int64_t>(1, max_rows / hc);  // query tokens per item
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (sequence, first token offset)
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t len = a.cu_seqlens[b + 1] - a.cu_seqlens[b];
    for (int64_t j = 0; j < len; j += mq) tiles.emplace_back(b, j);
  }
  const int64_t items = static_cast<int64_t>(tiles.size()) * a.kv_heads * nhc;
  const bool amx_rows = nhc == 1 && UseAmxRows<T>(a, G);
  int64_t decode_tiles = 0;
  for (int64_t b = 0; b < a.batch; ++b) decode_tiles += a.cu_seqlens[b + 1] - a.cu_seqlens[b] == 1;
  const int64_t hpi = amx_rows ? HeadsPerItem(decode_tiles, a.kv_heads, rt->num_cores, max_rows / G) : 1;
  auto body = [&]() {
    KernelPagedAttention<T> k(a, false, max_rows);
    float* st = k.State();
    int64_t begin, end;
    BlockRange(items, GetBlockIdx(), GetBlockNum(), &begin, &end);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t hci = it % nhc, kvh = (it / nhc) % a.kv_heads;
      const auto [b, j0] = tiles[it / (nhc * a.kv_heads)];
      const int64_t len = a.cu_seqlens[b + 1] - a.cu_seqlens[b];
      const int64_t t0 = a.cu_seqlens[b] + j0;
      const int64_t ntok = std::min(mq, len - j0);
      const int64_t g0 = hci * hc, hn = std::min(hc, G - g0);
      const int64_t rows = ntok * hn;
      const int64_t ctx = (a.k_cache != nullptr && a.ctx_lens != nullptr) ? a.ctx_lens[b] : 0;
      float* q = st;
      if (ntok == 1 && amx_rows) {  // one position: every row sees the same keys
        if (kvh % hpi != 0) continue;  // the item of the group's first kv head takes the whole group
        float* o1 = q + hpi * G * D;
        float* m1 = o1 + hpi * G * Dv;
        float* l1 = m1 + hpi * G;
        const T* q0 = static_cast<const T*>(a.q) + t0 * a.q_token_stride + kvh * G * a.q_head_stride;
        AmxItem(a, b, kvh, hpi, 0, a.causal ? ctx + j0 + 1 : ctx + len, q0, o1, m1, l1);
        WriteRows<T>(a, t0, kvh * G, 1, hpi * G, o1, l1);
        continue;
      }
      float* o = q + rows * D;
      float* m = o + rows * Dv;
      float* l = m + rows;
      for (int64_t j = 0; j < ntok; ++j) {
        const T* qsrc = static_cast<const T*>(a.q) + (t0 + j) * a.q_token_stride + (kvh * G + g0) * a.q_head_stride;
        for (int64_t g = 0; g < hn; ++g) LoadQ(q + (j * hn + g) * D, qsrc + g * a.q_head_stride, D, a.scale);
      }
      std::memset(o, 0, rows * Dv * 4);
      for (int64_t r = 0; r < rows; ++r) {
        m[r] = kNegInf;
        l[r] = 0.0f;
      }
      const int64_t pos0 = ctx + j0;
      const int64_t hi = a.causal ? pos0 + ntok : ctx + len;
      k.Attend(MakeSource<T>(a, b, kvh), 0, hi, static_cast<int>(rows), static_cast<int>(hn), pos0, a.causal != 0,
               q, o, m, l, MakeMask(a, b, j0, kvh * G + g0, hn));
      WriteRows<T>(a, t0, kvh * G + g0, ntok, hn, o, l);
    }
  };
  LaunchBlocks(std::min<int64_t>(items, rt->num_cores), rt, body);
}

}  // namespace attn

inline void paged_attention(const OmniPagedAttnArgs* a, const OmniRuntime* rt) {
  const bool prefill = a->cu_seqlens != nullptr;
  OMNI_DISPATCH_FLOAT(a->dtype, T, prefill ? attn::Prefill<T>(a, rt) : attn::Decode<T>(a, rt));
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
