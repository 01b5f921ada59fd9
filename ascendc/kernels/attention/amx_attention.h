// Decode-shaped attention on AMX (amx library, bf16; the avx512 library computes the score tiles with vdpbf16ps
// instead, amx::TileProduct16): the G query heads of each of `heads` kv heads at one
// position (GQA decode, and the 1-token chunks of a varlen step) over one key range.
//
// The general kernel (paged_attention.h) converts each 16-key chunk to fp32, transposes K and runs an online
// softmax per row; with only G = 4-8 rows per item that per-chunk work is paid for few rows, and an item per
// kv head reads a quarter of every cache line pair it walks (measured ~1 ms per layer at batch 16 x 300 keys,
// bf16, one core, against ~0.38 ms to stream those K/V blocks). Here:
//   keys    a 16-token chunk of every kv head of the item is copied out in cache order (sequential reads);
//   scores  S[key, head] = K[key, :] . Q[head, :]: the copied K rows are the A operand (16 keys x 32 dims a
//           tile, no conversion, no transpose), Q^T the B operand (VNNI pairs, built once per call);
//   softmax two-pass over the call's keys, vectorised across the G heads of a kv head (one zmm lane each);
//   values  O[head, :] += P[key, head] * V[key, :] on AVX-512 FMAs, V chunks copied out as K's.
// The result has the general kernel's state semantics: o un-normalised, m the max of the scaled scores, l the sum.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/moe/amx_tiles.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace attn {

#if defined(OMNI_HAVE_TILE_LAYOUT)  // AMX tiles, or vdpbf16ps on the same operands (the avx512 library)
constexpr bool kHaveAmxAttention = true;
constexpr int64_t kMaxAmxHeads = 64;  // kv heads one item may take

// Whether AmxSharedKeys serves G query rows per kv head with these head dims.
OMNI_INLINE bool AmxAttentionFits(int64_t G, int64_t D, int64_t Dv) {
  return G >= 1 && G <= 16 && D % 32 == 0 && Dv % 16 == 0;
}

// o[r, d0 : d0 + 16 NV] = init + sum_t p[t * ps + r] * V[t, d0 : ...] for r < NR, t < nt, where init is 0
// (first), o[r] * alpha[r] (alpha given: an online-softmax rescale) or o[r]; vrow(t, d) loads V[t, d : d + 16].
template <int NR, int NV, typename VRow>
OMNI_INLINE void ValueBlock(const VRow& vrow, int64_t nt, const float* p, int64_t d0, float* o, int64_t ldo,
                            bool first, const float* alpha, int64_t ps) {
  __m512 acc[NR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
    const __m512 al = alpha != nullptr ? _mm512_set1_ps(alpha[r]) : _mm512_set1_ps(1.0f);
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      acc[r][j] = first ? _mm512_setzero_ps() : _mm512_mul_ps(_mm512_loadu_ps(o + r * ldo + d0 + j * 16), al);
  }
  for (int64_t t = 0; t < nt; ++t) {
    __m512 vr[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) vr[j] = vrow(t, d0 + j * 16);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512 pr = _mm512_set1_ps(p[t * ps + r]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(pr, vr[j], acc[r][j]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + r * ldo + d0 + j * 16, acc[r][j]);
}

template <int NR, typename VRow>
OMNI_INLINE void ValueRows(const VRow& vrow, int64_t nt, const float* p, int64_t Dv, float* o, bool first,
                           const float* alpha, int64_t ps) {
  int64_t d0 = 0;
  for (; d0 + 64 <= Dv; d0 += 64) ValueBlock<NR, 4>(vrow, nt, p, d0, o, Dv, first, alpha, ps);
  switch ((Dv - d0) / 16) {
    case 3: ValueBlock<NR, 3>(vrow, nt, p, d0, o, Dv, first, alpha, ps); break;
    case 2: ValueBlock<NR, 2>(vrow, nt, p, d0, o, Dv, first, alpha, ps); break;
    case 1: ValueBlock<NR, 1>(vrow, nt, p, d0, o, Dv, first, alpha, ps); break;
    default: break;
  }
}

// G rows of o (row stride Dv) from one chunk: 4 rows at a time, then the rest. alpha: nullptr, or G rescales;
// p[t * ps + r]: key t's weight for row r.
template <typename VRow>
OMNI_INLINE void ValueChunk(const VRow& vrow, int64_t nt, const float* p, int64_t G, int64_t Dv, float* o, bool first,
                            const float* alpha = nullptr, int64_t ps = 16) {
  int64_t r = 0;
  auto al = [&](int64_t r0) { return alpha != nullptr ? alpha + r0 : nullptr; };
  for (; r + 4 <= G; r += 4) ValueRows<4>(vrow, nt, p + r, Dv, o + r * Dv, first, al(r), ps);
  switch (G - r) {
    case 3: ValueRows<3>(vrow, nt, p + r, Dv, o + r * Dv, first, al(r), ps); break;
    case 2: ValueRows<2>(vrow, nt, p + r, Dv, o + r * Dv, first, al(r), ps); break;
    case 1: ValueRows<1>(vrow, nt, p + r, Dv, o + r * Dv, first, al(r), ps); break;
    default: break;
  }
}

// V rows in bf16, `ldv` elements apart.
struct Bf16Rows {
  const uint16_t* v;
  int64_t ldv;
  OMNI_INLINE __m512 operator()(int64_t t, int64_t d) const {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + t * ldv + d));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
};

// r[i] = the sum of v[i]'s 16 lanes, for all 16 vectors at once (a transposing tree: 45 shuffles and adds
// instead of 16 separate reductions). Ends the dot-form scores: the bf16 ones below, the fp32 ones of
// dot_decode.h.
OMNI_INLINE __m512 HSum16x16(const __m512 (&v)[16]) {
  __m512 w[8], u[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: (x0+x2, y0+y2, x1+x3, y1+y3)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: the partial sums of v[4j .. 4j + 3] in order
    const __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
    u[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 c01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 c23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c01, c23, 0x88), _mm512_shuffle_f32x4(c01, c23, 0xDD));
}

#if !defined(OMNI_HAVE_AMX_TILES)
// S[t][g] = s[t * 16 + g] (lanes g >= G zero) for a chunk's 16 keys (bf16 rows `ldk` bytes apart) against the G
// query rows q (bf16, q_stride apart), D dims: vdpbf16ps dot products, 4 keys x G heads of accumulators, one
// transposing reduction per 4 keys. The outer-product form (amx::TileProduct16) fills only G of its 16 lanes;
// this one does 16 / G times less multiply work, which wins for G <= 4.
template <int G>
OMNI_INLINE void ScoresDot(const char* k, int64_t ldk, const uint16_t* q, int64_t q_stride, int64_t D, float* s) {
  for (int t0 = 0; t0 < 16; t0 += 4) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      __m512bh kv[4];
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) kv[t] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + (t0 + t) * ldk + d * 2));
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + g * q_stride + d));
#pragma GCC unroll 4
        for (int t = 0; t < 4; ++t) acc[t * 4 + g] = _mm512_dpbf16_ps(acc[t * 4 + g], kv[t], qv);
      }
    }
    alignas(64) float r[16];
    _mm512_store_ps(r, HSum16x16(acc));
    for (int t = 0; t < 4; ++t)
      for (int g = 0; g < 16; ++g) s[(t0 + t) * 16 + g] = g < G ? r[t * 4 + g] : 0.0f;
  }
}

// Whether the scores use Q^T (AMX, and the outer product without it) rather than the dot form (G <= 4).
OMNI_INLINE bool ScoresUseQt(int64_t G) { return G > 4; }

// The scores of one kv head's chunk without AMX: the dot form for G <= 4, else the outer product on Q^T.
OMNI_INLINE void ChunkScores(const char* k, int64_t ldk, const uint16_t* q, int64_t q_stride, const uint16_t* qt,
                             int64_t G, int64_t D, float* s) {
  switch (G) {
    case 1: return ScoresDot<1>(k, ldk, q, q_stride, D, s);
    case 2: return ScoresDot<2>(k, ldk, q, q_stride, D, s);
    case 3: return ScoresDot<3>(k, ldk, q, q_stride, D, s);
    case 4: return ScoresDot<4>(k, ldk, q, q_stride, D, s);
    default: return amx::TileProduct16(k, ldk, reinterpret_cast<const char*>(qt), D / 32, s);
  }
}
#else
OMNI_INLINE bool ScoresUseQt(int64_t) { return true; }
#endif

// Copies rows [c_lo, c_lo + nk) of every head into dst [16][heads * n] (token-major, heads side by side) and
// zeroes the rows after nk. row(h, pos) gives head h's bf16 row.
template <typename RowFn>
OMNI_INLINE void StageChunk(uint16_t* dst, int64_t heads, int64_t n, int64_t c_lo, int64_t nk, RowFn row) {
  for (int64_t i = 0; i < nk; ++i)
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(dst + (i * heads + h) * n, row(h, c_lo + i), static_cast<size_t>(n) * 2);
  if (nk < 16) std::memset(dst + nk * heads * n, 0, static_cast<size_t>((16 - nk) * heads * n) * 2);
}

// Whether keys [c_lo, c_lo + 16) are cached rows of one block (rows a fixed stride apart).
template <typename Src>
OMNI_INLINE bool Direct(const Src& src, int64_t c_lo) {
  return c_lo + 16 <= src.ctx && src.kc != nullptr && c_lo % src.bs + 16 <= src.bs;
}

// Points rows[h] at head h's K (keys) or V rows of chunk [c_lo, c_lo + nk) and returns their stride in elements:
// 16 cached rows inside one block are read where they lie; other chunks (a block edge, the step's new tokens)
// are copied out into buf first.
template <typename Src>
OMNI_INLINE int64_t ChunkRows(const Src* srcs, int64_t heads, int64_t n, int64_t c_lo, int64_t nk, bool keys,
                              uint16_t* buf, const uint16_t** rows) {
  auto row = [&](int64_t h, int64_t pos) {
    return reinterpret_cast<const uint16_t*>(keys ? srcs[h].K(pos) : srcs[h].V(pos));
  };
  if (Direct(srcs[0], c_lo)) {
    for (int64_t h = 0; h < heads; ++h) rows[h] = row(h, c_lo);
    return keys ? srcs[0].kts : srcs[0].vts;
  }
  StageChunk(buf, heads, n, c_lo, nk, row);
  for (int64_t h = 0; h < heads; ++h) rows[h] = buf + h * n;
  return heads * n;
}

// Attention over keys [lo, hi) for `heads` kv heads: srcs[h].K(pos) / V(pos) give head h's bf16 rows (D / Dv
// elements); query row g of head h at q + (h * G + g) * q_stride (bf16, unscaled). Writes, for row
// R = h * G + g: o[R * Dv : ...] un-normalised, m[R], l[R]. Caller: AmxAttentionFits(G, D, Dv), hi > lo.
template <typename Src>
inline void AmxSharedKeys(const Src* srcs, int64_t heads, int64_t G, int64_t lo, int64_t hi, const uint16_t* q,
                          int64_t q_stride, int64_t D, int64_t Dv, float scale, float* o, float* m, float* l) {
  const int64_t n = hi - lo, ks_n = D / 32, chunks = (n + 15) / 16;
  thread_local std::vector<uint16_t> qt_buf, kv_buf;
  thread_local std::vector<float> s_buf;
  kv_buf.resize(static_cast<size_t>(16 * heads * std::max(D, Dv)));
  s_buf.resize(static_cast<size_t>(heads * chunks * 256));
  // Q^T in VNNI pairs, 16 columns (rows g >= G stay zero): qt[h][ks][p][g][j] = q[h G + g][32 ks + 2 p + j].
  // Not built where the dot-form scores read q itself.
  if (ScoresUseQt(G)) {
    qt_buf.assign(static_cast<size_t>(heads * ks_n * 512), 0);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t g = 0; g < G; ++g) {
        const uint16_t* qr = q + (h * G + g) * q_stride;
        uint16_t* qh = qt_buf.data() + h * ks_n * 512;
        for (int64_t d = 0; d < D; ++d) qh[(d / 32) * 512 + ((d % 32) / 2) * 32 + g * 2 + (d % 2)] = qr[d];
      }
  } else {
    qt_buf.resize(static_cast<size_t>(heads * ks_n * 512));  // unread: keeps qt + offsets a valid pointer
  }
  const uint16_t* qt = qt_buf.data();
  uint16_t* kv = kv_buf.data();
  const uint16_t* rows[kMaxAmxHeads];  // head h's rows of the current chunk
  float* s = s_buf.data();  // s[h][t][16]: head h's scores of key lo + t, one column per query row

  amx::LoadConfig();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t c_lo = lo + c * 16;
    const int64_t ldk = ChunkRows(srcs, heads, D, c_lo, std::min<int64_t>(16, hi - c_lo), true, kv, rows) * 2;
    for (int64_t h = 0; h < heads; ++h) {
#if defined(OMNI_HAVE_AMX_TILES)
      _tile_zero(0);
      for (int64_t ks = 0; ks < ks_n; ++ks) {
        _tile_loadd(1, rows[h] + ks * 32, ldk);
        _tile_loadd(2, qt + (h * ks_n + ks) * 512, 64);
        _tile_dpbf16ps(0, 1, 2);
      }
      _tile_stored(0, s + (h * chunks + c) * 256, 64);
#else
      ChunkScores(reinterpret_cast<const char*>(rows[h]), ldk, q + h * G * q_stride, q_stride, qt + h * ks_n * 512, G,
                  D, s + (h * chunks + c) * 256);
#endif
    }
  }
  amx::Release();

  // Softmax over the keys of each kv head, one lane per query row.
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t h = 0; h < heads; ++h) {
    float* sh = s + h * chunks * 256;
    __m512 mx = _mm512_set1_ps(-__builtin_inff());
    for (int64_t t = 0; t < n; ++t) mx = _mm512_max_ps(mx, _mm512_mul_ps(_mm512_loadu_ps(sh + t * 16), sc));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const __m512 p = amx::Exp16(_mm512_fmsub_ps(_mm512_loadu_ps(sh + t * 16), sc, mx));
      _mm512_storeu_ps(sh + t * 16, p);
      sum = _mm512_add_ps(sum, p);
    }
    alignas(64) float mv[16], lv[16];
    _mm512_store_ps(mv, mx);
    _mm512_store_ps(lv, sum);
    for (int64_t g = 0; g < G; ++g) {
      m[h * G + g] = mv[g];
      l[h * G + g] = lv[g];
    }
  }

  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t c_lo = lo + c * 16, nk = std::min<int64_t>(16, hi - c_lo);
    const int64_t ldv = ChunkRows(srcs, heads, Dv, c_lo, nk, false, kv, rows);
    for (int64_t h = 0; h < heads; ++h)
      ValueChunk(Bf16Rows{rows[h], ldv}, nk, s + (h * chunks + c) * 256, G, Dv, o + h * G * Dv, c == 0);
  }
}
#else
constexpr bool kHaveAmxAttention = false;
constexpr int64_t kMaxAmxHeads = 64;
OMNI_INLINE bool AmxAttentionFits(int64_t, int64_t, int64_t) { return false; }
template <typename Src>
inline void AmxSharedKeys(const Src*, int64_t, int64_t, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t,
                          float, float*, float*, float*) {}
#endif

}  // namespace attn
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
