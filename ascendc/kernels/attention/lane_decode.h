// fp32 decode-shaped attention on AVX-512 with the query heads in zmm lanes (the avx512 and amx libraries):
// MLA decode (all H heads share one latent row per key) and GQA decode with more than 8 query rows per kv head
// (fewer go to the dot form of dot_decode.h: with G rows the score products here fill G of 16 lanes).
//
// The general kernel (paged_attention.h) transposes every 16-key chunk of K (576 dims for MLA: 144 8x8
// shuffling transposes per chunk, on the port the FMAs need) and runs its online softmax one row and one
// scalar exp at a time; MLA fp32 measured ~27 % of the FMA peak that way. Here, per 16-key chunk and kv head:
//   stage   the chunk's K (and V) rows into 16 x 16 blocks ([d / 16][key][d % 16]), so every broadcast below
//           is a constant offset from one pointer (16 row pointers would not fit the general registers);
//   scores  S[key][g] = sum_d K[key, d] * Qt[d][g]: one zmm accumulator per key (lanes = 16 query rows),
//           a broadcast K element times a Qt row (Q scaled, transposed once per item);
//   softmax online across the chunk, vectorised across the lanes: one max, 17 exps per 16 keys;
//   values  O[g, :] = O[g, :] * alpha[g] + sum_t P[t][g] * V[t, :], 4 rows x 64 columns of accumulators.
// MLA's V is K's first Dv columns: the staged K blocks serve both products. G > 16 takes lane groups of 16 rows.
// The state semantics are the general kernel's: o un-normalised, m the max of the scaled scores, l the sum.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/attention/amx_attention.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace attn {

#if defined(OMNI_HAVE_TILE_LAYOUT)  // both AVX-512 libraries
constexpr bool kHaveLaneDecode = true;

// Whether LaneSharedKeys serves G fp32 query rows per kv head with these head dims.
OMNI_INLINE bool LaneDecodeFits(int64_t G, int64_t D, int64_t Dv) {
  return G >= 1 && D % 16 == 0 && Dv % 16 == 0 && Dv <= D;
}

// dst[(d / 16) * 256 + t * 16 + d % 16] = row(t)[d] for t < nk, zero for nk <= t < 16; n % 16 == 0.
template <typename RowFn>
OMNI_INLINE void StageBlocks(float* dst, int64_t n, int64_t nk, const RowFn& row) {
  for (int64_t t = 0; t < 16; ++t) {
    const float* r = t < nk ? row(t) : nullptr;
    for (int64_t db = 0; db < n / 16; ++db)
      _mm512_store_ps(dst + db * 256 + t * 16, r != nullptr ? _mm512_loadu_ps(r + db * 16) : _mm512_setzero_ps());
  }
}

// rows[t] = src.K(pos + t) (keys) or src.V(pos + t) for t < n, `zero` for n <= t < 16: one block-table lookup per
// cache block, not per row (a lookup divides by the block size: at G = 1 that cost more than the row's FMAs).
template <typename Src>
OMNI_INLINE void ChunkRowPointers(const Src& src, int64_t pos, int64_t n, bool keys, const float* zero,
                                  const float** rows) {
  const int64_t stride = keys ? src.kts : src.vts;
  int64_t left = 0;  // rows left in the current cache block
  const float* r = nullptr;
  for (int64_t t = 0; t < 16; ++t) {
    const int64_t p = pos + t;
    if (t >= n) {
      rows[t] = zero;
    } else if (p >= src.ctx) {  // a new token of this step: no table
      rows[t] = keys ? src.K(p) : src.V(p);
    } else {
      if (left == 0) {
        r = keys ? src.K(p) : src.V(p);
        left = src.bs - p % src.bs;
      } else {
        r += stride;
      }
      rows[t] = r;
      --left;
    }
  }
}

// The rows of one unit (a 16-key chunk of one kv head).
struct UnitRows {
  const float* k[16];
  const float* v[16];
};

// The chunk pipeline of LaneScores: while it computes unit u (a 16-key chunk of one kv head) it copies unit u + 1's
// rows (from L2) into the other staging buffer and pulls unit u + 2's rows into L2, one cache line per row and
// 16 FMAs each. The cache blocks lie anywhere, so the hardware prefetchers restart at every block: staging
// from memory in a loop of its own stalled on those loads (40 % of the time), and a burst of 16 prefetches
// filled the line fill buffers. Rows past a unit's keys point at a zero row (copied as zeros).
struct ChunkPipe {
  const UnitRows* copy = nullptr;   // unit u + 1
  const UnitRows* fetch = nullptr;  // unit u + 2
  float* dst_k = nullptr;  // staging buffers of unit u + 1
  float* dst_v = nullptr;
  int64_t v_lines = 0;  // 64-byte lines per V row; 0 = V is not staged separately
};

// s[t] = sum_d kb[t, d] * qt[d] (lane g: query row g) for a staged chunk's 16 keys, D dims; runs `pipe`
// (nullable).
OMNI_INLINE void LaneScores(const float* kb, const float* qt, int64_t D, const ChunkPipe* pipe, __m512 (&s)[16]) {
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) s[t] = _mm512_setzero_ps();
  for (int64_t db = 0; db < D / 16; ++db) {
    const float* k = kb + db * 256;
    const float* q = qt + db * 256;
    const bool with_v = pipe != nullptr && db < pipe->v_lines;
#pragma GCC unroll 16
    for (int dd = 0; dd < 16; ++dd) {
      const __m512 qv = _mm512_load_ps(q + dd * 16);
      if (pipe != nullptr) {
        _mm512_store_ps(pipe->dst_k + db * 256 + dd * 16, _mm512_loadu_ps(pipe->copy->k[dd] + db * 16));
        _mm_prefetch(reinterpret_cast<const char*>(pipe->fetch->k[dd] + db * 16), _MM_HINT_T1);
      }
      if (with_v) {
        _mm512_store_ps(pipe->dst_v + db * 256 + dd * 16, _mm512_loadu_ps(pipe->copy->v[dd] + db * 16));
        _mm_prefetch(reinterpret_cast<const char*>(pipe->fetch->v[dd] + db * 16), _MM_HINT_T1);
      }
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) s[t] = _mm512_fmadd_ps(_mm512_set1_ps(k[t * 16 + dd]), qv, s[t]);
    }
  }
}

// One chunk's online-softmax step for 16 lanes over keys t < nk (nk >= 1): updates the running max m and sum l,
// writes p[t * 16 + g] (zero for t >= nk) and alpha[g] = the factor the lane's earlier output is rescaled by.
OMNI_INLINE void LaneSoftmaxStep(const __m512 (&s)[16], int64_t nk, float* m, float* l, float* p, float* alpha) {
  const __m512 m_old = _mm512_loadu_ps(m);
  __m512 mx = m_old;
  for (int64_t t = 0; t < nk; ++t) mx = _mm512_max_ps(mx, s[t]);
  const __m512 al = amx::Exp16(_mm512_sub_ps(m_old, mx));  // m_old = -inf: exactly 0 (Exp16 flushes)
  __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) {
    const __m512 e = t < nk ? amx::Exp16(_mm512_sub_ps(s[t], mx)) : _mm512_setzero_ps();
    _mm512_store_ps(p + t * 16, e);
    sum = _mm512_add_ps(sum, e);
  }
  _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), al, sum));
  _mm512_storeu_ps(m, mx);
  _mm512_storeu_ps(alpha, al);
}

// V rows staged by StageBlocks.
struct StagedRows {
  const float* vb;
  OMNI_INLINE __m512 operator()(int64_t t, int64_t d) const { return _mm512_load_ps(vb + (d / 16) * 256 + t * 16); }
};

// Attention over keys [lo, hi) for `heads` kv heads (hi > lo): srcs[h].K(pos) / V(pos) give head h's fp32 rows
// (D / Dv elements; shared: V is K's first Dv columns); query row g of head h at q + (h * G + g) * q_stride
// (unscaled). Writes, for row R = h * G + g: o[R * Dv : ...] un-normalised, m[R], l[R].
// Caller: LaneDecodeFits(G, D, Dv).
template <typename Src>
inline void LaneSharedKeys(const Src* srcs, int64_t heads, int64_t G, int64_t lo, int64_t hi, bool shared,
                           const float* q, int64_t q_stride, int64_t D, int64_t Dv, float scale, float* o, float* m,
                           float* l) {
  const int64_t ng = (G + 15) / 16;  // lane groups per kv head
  thread_local std::vector<float> buf;
  const int64_t qt_n = heads * ng * D * 16, st_n = heads * ng * 16, stage_n = (D + Dv) * 16;
  buf.assign(static_cast<size_t>(qt_n + 2 * st_n + 2 * stage_n + D + 256 + 16 + 16), 0.0f);
  // 64-byte aligned: the staged blocks and Qt rows are read with aligned loads (every offset below is a
  // multiple of 16 floats)
  float* qt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
  // qt: [heads * ng][D][16], scaled Q^T, lanes past G zero
  float* ms = qt + qt_n;            // [heads * ng][16] running max
  float* ls = ms + st_n;            // [heads * ng][16] running sum
  float* stage = ls + st_n;         // two staging buffers: K chunk (D * 16) | V chunk (Dv * 16, unless shared)
  float* p = stage + 2 * stage_n;   // [16 keys][16 lanes]
  float* alpha = p + 256;           // [16]
  const float* zero_row = alpha + 16;  // D zeros
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t g = 0; g < G; ++g) {
      const float* qr = q + (h * G + g) * q_stride;
      float* dst = qt + (h * ng + g / 16) * D * 16 + g % 16;
      for (int64_t d = 0; d < D; ++d) dst[d * 16] = qr[d] * scale;
    }
  std::fill(ms, ms + st_n, -__builtin_inff());

  // unit u = (chunk u / heads, kv head u % heads); its rows (zero_row past its keys, every row past the units)
  const int64_t units = (hi - lo + 15) / 16 * heads;
  auto fill = [&](int64_t u, UnitRows& r) {
    const int64_t pos = lo + u / heads * 16, n = u < units ? std::min<int64_t>(16, hi - pos) : 0;
    ChunkRowPointers(srcs[u % heads], pos, n, true, zero_row, r.k);
    if (shared) {
      std::fill(r.v, r.v + 16, zero_row);
    } else {
      ChunkRowPointers(srcs[u % heads], pos, n, false, zero_row, r.v);
    }
  };
  UnitRows unit_rows[3];  // units u, u + 1, u + 2 (mod 3)
  fill(0, unit_rows[0]);
  fill(1, unit_rows[1]);
  ChunkPipe pipe;
  pipe.v_lines = shared ? 0 : Dv / 16;
  auto kbuf = [&](int64_t u) { return stage + (u % 2) * stage_n; };
  StageBlocks(kbuf(0), D, 16, [&](int64_t t) { return unit_rows[0].k[t]; });
  if (!shared) StageBlocks(kbuf(0) + D * 16, Dv, 16, [&](int64_t t) { return unit_rows[0].v[t]; });
  for (int64_t u = 0; u < units; ++u) {
    const int64_t h = u % heads, c_lo = lo + u / heads * 16, nk = std::min<int64_t>(16, hi - c_lo);
    float* kb = kbuf(u);
    pipe.dst_k = kbuf(u + 1);
    pipe.dst_v = pipe.dst_k + D * 16;
    fill(u + 2, unit_rows[(u + 2) % 3]);
    pipe.copy = &unit_rows[(u + 1) % 3];
    pipe.fetch = &unit_rows[(u + 2) % 3];
    const StagedRows vrows{shared ? kb : kb + D * 16};
    for (int64_t gi = 0; gi < ng; ++gi) {
      const int64_t lg = h * ng + gi, rows = std::min<int64_t>(16, G - gi * 16);
      __m512 s[16];
      LaneScores(kb, qt + lg * D * 16, D, gi == 0 && u + 1 < units ? &pipe : nullptr, s);
      LaneSoftmaxStep(s, nk, ms + lg * 16, ls + lg * 16, p, alpha);
      ValueChunk(vrows, nk, p, rows, Dv, o + (h * G + gi * 16) * Dv, c_lo == lo, alpha);
    }
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t g = 0; g < G; ++g) {
      m[h * G + g] = ms[(h * ng + g / 16) * 16 + g % 16];
      l[h * G + g] = ls[(h * ng + g / 16) * 16 + g % 16];
    }
}
#else
constexpr bool kHaveLaneDecode = false;
OMNI_INLINE bool LaneDecodeFits(int64_t, int64_t, int64_t) { return false; }
template <typename Src>
inline void LaneSharedKeys(const Src*, int64_t, int64_t, int64_t, int64_t, bool, const float*, int64_t, int64_t,
                           int64_t, float, float*, float*, float*) {}
#endif

}  // namespace attn
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
