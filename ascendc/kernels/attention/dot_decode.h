// fp32 decode-shaped attention on AVX-512 for few query rows per kv head (G <= 8: GQA 32/8, 64/8, MQA-like
// shapes; the avx512 and amx libraries). lane_decode.h puts one query row per zmm lane, so with G = 4 three
// quarters of its score FMAs multiply zero lanes: GQA 32/8 x 128 ran at 0.64-0.78x vLLM at batch 1 (Intel SPR),
// compute-bound (the cache was L2-resident at 1k keys and no faster per key). Here the lanes run over head dims:
//   scores  S[key, g] = K[key, :] . Q[g, :] as 16 / GP keys x GP rows of accumulators (GP = G rounded up to a
//           power of two), each a zmm of partial sums over d, one transposing reduction (HSum16x16) per group:
//           G x D / 16 FMAs per key instead of D, the K rows read where they lie (no staging copies);
//   softmax online per chunk on GP score vectors whose lane i holds (key i / GP, row i % GP): maxima and sums
//           over the lanes of one row by log2(16 / GP) rotations; 16 / (16 / GP) = GP exps per 16 keys;
//   values  O[g, :] = O[g, :] * alpha[g] + sum_t P[t][g] * V[t, :] (ValueChunk, weights GP apart).
// The next unit's rows are prefetched into L1 inside this unit's score loop (the rows of one kv head lie a cache
// row apart, a stride the hardware prefetchers do not follow). State semantics as lane_decode.h.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/attention/lane_decode.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace attn {

#if defined(OMNI_HAVE_TILE_LAYOUT)  // both AVX-512 libraries
constexpr int64_t kMaxDotRows = 8;  // above this the lanes form wastes at most half its lanes and needs no reduction

// Whether DotSharedKeys serves G fp32 query rows per kv head with these head dims.
OMNI_INLINE bool DotDecodeFits(int64_t G, int64_t D, int64_t Dv) {
  return G <= kMaxDotRows && LaneDecodeFits(G, D, Dv);
}

// V rows by pointer.
struct RowPointers {
  const float* const* r;
  OMNI_INLINE __m512 operator()(int64_t t, int64_t d) const { return _mm512_loadu_ps(r[t] + d); }
};

// s[j] lane i = K[key j * (16 / GP) + i / GP] . qs[i % GP] over D dims; prefetches `next` (nullable; its V rows
// unless shared) into L1 on the way.
template <int GP>
OMNI_INLINE void DotScores(const UnitRows& rows, const UnitRows* next, bool shared, const float* qs, int64_t D,
                           int64_t Dv, __m512 (&s)[GP]) {
  constexpr int KG = 16 / GP;
#pragma GCC unroll 8
  for (int j = 0; j < GP; ++j) {
    const float* const* kr = rows.k + j * KG;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      if (next != nullptr) {
#pragma GCC unroll 16
        for (int kt = 0; kt < KG; ++kt) {
          _mm_prefetch(reinterpret_cast<const char*>(next->k[j * KG + kt] + d), _MM_HINT_T0);
          if (!shared && d < Dv) _mm_prefetch(reinterpret_cast<const char*>(next->v[j * KG + kt] + d), _MM_HINT_T0);
        }
      }
#pragma GCC unroll 8
      for (int g = 0; g < GP; ++g) {
        const __m512 qv = _mm512_load_ps(qs + g * D + d);
#pragma GCC unroll 16
        for (int kt = 0; kt < KG; ++kt)
          acc[kt * GP + g] = _mm512_fmadd_ps(_mm512_loadu_ps(kr[kt] + d), qv, acc[kt * GP + g]);
      }
    }
    s[j] = HSum16x16(acc);
  }
}

// v reduced by op over the lanes of each row (lanes i, i + GP, i + 2 GP, ...); every lane gets its row's result.
template <int GP, typename Op>
OMNI_INLINE __m512 SameRowReduce(__m512 v, const Op& op) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
#pragma GCC unroll 4
  for (int step = GP; step < 16; step *= 2) {
    const __m512i from = _mm512_and_si512(_mm512_add_epi32(lane, _mm512_set1_epi32(step)), _mm512_set1_epi32(15));
    v = op(v, _mm512_permutexvar_ps(from, v));
  }
  return v;
}

// One chunk's online-softmax step over keys t < nk (nk >= 1) for the score vectors of DotScores: m and l hold
// each row's running max and sum in every lane of that row (i % GP); writes p[t * GP + g] (zero for t >= nk)
// and alpha (lane g: row g's rescale of its earlier output).
template <int GP>
OMNI_INLINE void DotSoftmaxStep(const __m512 (&s)[GP], int64_t nk, float* m, float* l, float* p, float* alpha) {
  constexpr int KG = 16 / GP;
  __mmask16 valid[GP];
  __m512 mx = _mm512_set1_ps(-__builtin_inff());
#pragma GCC unroll 8
  for (int j = 0; j < GP; ++j) {
    const int64_t keys = std::clamp<int64_t>(nk - j * KG, 0, KG);
    valid[j] = keys == KG ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (keys * GP)) - 1u);
    mx = _mm512_mask_max_ps(mx, valid[j], mx, s[j]);
  }
  mx = SameRowReduce<GP>(mx, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); });
  const __m512 m_old = _mm512_load_ps(m);
  mx = _mm512_max_ps(mx, m_old);
  const __m512 al = amx::Exp16(_mm512_sub_ps(m_old, mx));  // m_old = -inf: exactly 0 (Exp16 flushes)
  __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int j = 0; j < GP; ++j) {
    const __m512 e = _mm512_maskz_mov_ps(valid[j], amx::Exp16(_mm512_sub_ps(s[j], mx)));
    _mm512_store_ps(p + j * 16, e);
    sum = _mm512_add_ps(sum, e);
  }
  sum = SameRowReduce<GP>(sum, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); });
  _mm512_store_ps(l, _mm512_fmadd_ps(_mm512_load_ps(l), al, sum));
  _mm512_store_ps(m, mx);
  _mm512_store_ps(alpha, al);
}

template <int GP, typename Src>
inline void DotKeys(const Src* srcs, int64_t heads, int64_t G, int64_t lo, int64_t hi, bool shared, const float* q,
                    int64_t q_stride, int64_t D, int64_t Dv, float scale, float* o, float* m, float* l) {
  thread_local std::vector<float> buf;
  const int64_t qs_n = heads * GP * D, st_n = heads * 16;
  buf.assign(static_cast<size_t>(qs_n + 2 * st_n + 256 + 16 + D + 16), 0.0f);
  // 64-byte aligned; every offset below is a multiple of 16 floats
  float* qs = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
  float* ms = qs + qs_n;  // [heads][16] running max (lane i: row i % GP)
  float* ls = ms + st_n;  // [heads][16] running sum
  float* p = ls + st_n;   // [16 keys][GP rows]
  float* alpha = p + 256;
  const float* zero_row = alpha + 16;  // D zeros
  for (int64_t h = 0; h < heads; ++h)  // qs: [heads][GP][D], Q scaled, rows past G zero
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) qs[(h * GP + g) * D + d] = q[(h * G + g) * q_stride + d] * scale;
  std::fill(ms, ms + st_n, -__builtin_inff());

  // unit u = (chunk u / heads, kv head u % heads), as lane_decode.h: the item's heads are adjacent in the cache
  const int64_t units = (hi - lo + 15) / 16 * heads;
  auto fill = [&](int64_t u, UnitRows& r) {
    const int64_t pos = lo + u / heads * 16, n = std::min<int64_t>(16, hi - pos);
    ChunkRowPointers(srcs[u % heads], pos, n, true, zero_row, r.k);
    if (shared) {
      std::copy(r.k, r.k + 16, r.v);
    } else {
      ChunkRowPointers(srcs[u % heads], pos, n, false, zero_row, r.v);
    }
  };
  UnitRows rows[2];
  fill(0, rows[0]);
  for (int64_t u = 0; u < units; ++u) {
    const UnitRows& cur = rows[u % 2];
    const bool more = u + 1 < units;
    if (more) fill(u + 1, rows[(u + 1) % 2]);
    const int64_t h = u % heads, c_lo = lo + u / heads * 16, nk = std::min<int64_t>(16, hi - c_lo);
    __m512 s[GP];
    DotScores<GP>(cur, more ? &rows[(u + 1) % 2] : nullptr, shared, qs + h * GP * D, D, Dv, s);
    DotSoftmaxStep<GP>(s, nk, ms + h * 16, ls + h * 16, p, alpha);
    ValueChunk(RowPointers{cur.v}, nk, p, G, Dv, o + h * G * Dv, c_lo == lo, alpha, GP);
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t g = 0; g < G; ++g) {
      m[h * G + g] = ms[h * 16 + g];
      l[h * G + g] = ls[h * 16 + g];
    }
}

// LaneSharedKeys's contract for G <= kMaxDotRows (caller: DotDecodeFits(G, D, Dv)).
template <typename Src>
inline void DotSharedKeys(const Src* srcs, int64_t heads, int64_t G, int64_t lo, int64_t hi, bool shared,
                          const float* q, int64_t q_stride, int64_t D, int64_t Dv, float scale, float* o, float* m,
                          float* l) {
  switch (G) {
    case 1: return DotKeys<1>(srcs, heads, G, lo, hi, shared, q, q_stride, D, Dv, scale, o, m, l);
    case 2: return DotKeys<2>(srcs, heads, G, lo, hi, shared, q, q_stride, D, Dv, scale, o, m, l);
    case 3:
    case 4: return DotKeys<4>(srcs, heads, G, lo, hi, shared, q, q_stride, D, Dv, scale, o, m, l);
    default: return DotKeys<8>(srcs, heads, G, lo, hi, shared, q, q_stride, D, Dv, scale, o, m, l);
  }
}
#else
OMNI_INLINE bool DotDecodeFits(int64_t, int64_t, int64_t) { return false; }
template <typename Src>
inline void DotSharedKeys(const Src*, int64_t, int64_t, int64_t, int64_t, bool, const float*, int64_t, int64_t,
                          int64_t, float, float*, float*, float*) {}
#endif

}  // namespace attn
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
