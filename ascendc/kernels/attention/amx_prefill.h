// Prefill-shaped attention on AMX (amx library, bf16): a query tile (several positions of one sequence, all G
// query heads of one kv head) against that sequence's cached and new keys, causal or not.
//
// The general kernel (paged_attention.h) runs the score and value products on fp32 FMAs at ~20-80 GFLOP/s;
// at a prefill of 16 prompts x 265 tokens it was a quarter of the step. Here both products are tile
// products (tdpbf16ps):
//   keys    each (sequence, kv head) is packed once per call (PackKeys): K^T as B tiles (16 keys x 32 dims,
//           VNNI pairs of dims) and V as B tiles (32 keys in VNNI pairs x 16 dims), zero past the last key;
//   scores  S = Q K^T per 16-row block of the tile's query rows (staged contiguous) and 16-key chunk;
//   softmax online over blocks of kPfKeys keys, exact per row (masked lanes excluded, not just made small);
//           P rounded once to bf16 for the value product, as flash attention does on GPUs;
//   values  O += P V with O kept in fp32 between blocks (rescaled when a row's max grows).
// Output: o [rows][Dv] un-normalised and l [rows] (the caller divides), rows r = j * G + g.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/attention/amx_attention.h"
#include "kernels/attention/paged_attention.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace attn {

#if defined(OMNI_HAVE_AMX_TILES)
constexpr bool kHaveAmxPrefill = true;
constexpr int64_t kPfRows = 64;   // query rows per tile item: 4 AMX row blocks
constexpr int64_t kPfKeys = 256;  // keys per online-softmax block

OMNI_INLINE bool AmxPrefillFits(int64_t G, int64_t D, int64_t Dv) {
  return G >= 1 && G <= kPfRows && D % 32 == 0 && Dv % 16 == 0 && D <= 1024 && Dv <= 1024;
}

// bf16 elements of one (sequence, kv head)'s packed keys: K^T tiles [nk / 16][D / 32][512] then V tiles
// [nk / 32][Dv / 16][512], nk = keys rounded up to 32.
OMNI_INLINE int64_t PackedKeyElems(int64_t keys, int64_t D, int64_t Dv) { return AlignUp(keys, 32) * (D + Dv); }

// K^T tile (c, ds) element [k2][n][p] = K[16 c + n][32 ds + 2 k2 + p]: the 16 x 16 transpose of the chunk's
// 32-bit dim pairs. V tile (c, vs) element [k2][n][p] = V[32 c + 2 k2 + p][16 vs + n]: two key rows
// interleaved. src.K(pos) / V(pos): bf16 rows of D / Dv elements.
template <typename Src>
inline void PackKeys(const Src& src, int64_t keys, int64_t D, int64_t Dv, uint16_t* dst) {
  const int64_t nk = AlignUp(keys, 32), ks_n = D / 32, vs_n = Dv / 16;
  uint16_t* kt = dst;
  uint16_t* vt = dst + nk * D;
  for (int64_t c = 0; c < nk / 16; ++c) {
    for (int64_t n = 0; n < 16; ++n) {
      const int64_t pos = c * 16 + n;
      const uint32_t* row = pos < keys ? reinterpret_cast<const uint32_t*>(src.K(pos)) : nullptr;
      for (int64_t ds = 0; ds < ks_n; ++ds) {
        uint32_t* tile = reinterpret_cast<uint32_t*>(kt + (c * ks_n + ds) * 512);
        for (int64_t k2 = 0; k2 < 16; ++k2) tile[k2 * 16 + n] = row != nullptr ? row[ds * 16 + k2] : 0u;
      }
    }
  }
  for (int64_t c = 0; c < nk / 32; ++c) {
    for (int64_t k2 = 0; k2 < 16; ++k2) {
      const int64_t p0 = c * 32 + 2 * k2;
      const uint16_t* r0 = p0 < keys ? reinterpret_cast<const uint16_t*>(src.V(p0)) : nullptr;
      const uint16_t* r1 = p0 + 1 < keys ? reinterpret_cast<const uint16_t*>(src.V(p0 + 1)) : nullptr;
      for (int64_t vs = 0; vs < vs_n; ++vs) {
        auto lanes = [&](const uint16_t* r) {
          return r != nullptr ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + vs * 16)))
                              : _mm512_setzero_si512();
        };
        // 32-bit lane n = (r1[n] << 16) | r0[n]: element pair [n][0] = key p0, [n][1] = key p0 + 1
        const __m512i pair = _mm512_or_si512(lanes(r0), _mm512_slli_epi32(lanes(r1), 16));
        _mm512_storeu_si512(vt + (c * vs_n + vs) * 512 + k2 * 32, pair);
      }
    }
  }
}

// One query tile: rows r = j * G + g (j < ntok positions from pos0, g < G heads), query row (j, g) at
// q + j * q_tok + g * q_head (bf16, unscaled), against packed keys [0, keys) (PackKeys). A row at position p
// sees keys <= p when causal, else all. o: AlignUp(ntok * G, 16) x Dv floats, l: as many rows.
inline void AmxPrefillTile(const uint16_t* q, int64_t q_tok, int64_t q_head, int64_t ntok, int64_t G, int64_t pos0,
                           bool causal, int64_t keys, const uint16_t* packed, int64_t D, int64_t Dv, float scale,
                           float* o, float* l) {
  const int64_t R = ntok * G, Rp = AlignUp(R, 16), ks_n = D / 32, vs_n = Dv / 16;
  const int64_t hi = causal ? std::min(keys, pos0 + ntok) : keys;  // keys the tile's last row sees
  thread_local std::vector<uint16_t> qs_buf, p_buf;
  thread_local std::vector<float> s_buf, m_buf;
  qs_buf.assign(static_cast<size_t>(Rp * D), 0);  // padding rows 0: finite scores, results dropped
  p_buf.resize(static_cast<size_t>(Rp * kPfKeys));
  s_buf.resize(static_cast<size_t>(Rp * kPfKeys));
  m_buf.assign(static_cast<size_t>(Rp), kNegInf);
  uint16_t* qs = qs_buf.data();
  uint16_t* p = p_buf.data();
  float* s = s_buf.data();
  float* m = m_buf.data();
  for (int64_t j = 0; j < ntok; ++j)
    for (int64_t g = 0; g < G; ++g) std::memcpy(qs + (j * G + g) * D, q + j * q_tok + g * q_head, D * 2);
  std::memset(o, 0, static_cast<size_t>(Rp * Dv) * 4);
  std::fill(l, l + Rp, 0.0f);
  const uint16_t* kt = packed;
  const uint16_t* vt = packed + AlignUp(keys, 32) * D;
  const __m512 sc = _mm512_set1_ps(scale);

  amx::LoadConfig();
  for (int64_t k0 = 0; k0 < hi; k0 += kPfKeys) {
    const int64_t kn = std::min(kPfKeys, hi - k0), kn32 = AlignUp(kn, 32);
    for (int64_t rb = 0; rb < Rp / 16; ++rb) {  // S [Rp][kn32] = Q K^T
      for (int64_t c = 0; c < kn32 / 16; ++c) {
        _tile_zero(0);
        for (int64_t ds = 0; ds < ks_n; ++ds) {
          _tile_loadd(1, qs + rb * 16 * D + ds * 32, D * 2);
          _tile_loadd(2, kt + ((k0 / 16 + c) * ks_n + ds) * 512, 64);
          _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, s + rb * 16 * kPfKeys + c * 16, kPfKeys * 4);
      }
    }
    for (int64_t r = 0; r < Rp; ++r) {  // online softmax of the block, row by row
      const int64_t lim = causal && r < R ? std::min(hi, pos0 + r / G + 1) : hi;
      const int64_t valid = std::max<int64_t>(0, std::min(kn, lim - k0));
      float* sr = s + r * kPfKeys;
      uint16_t* pr = p + r * kPfKeys;
      __m512 mx = _mm512_set1_ps(kNegInf);
      for (int64_t i = 0; i < kn32; i += 16)
        mx = _mm512_mask_max_ps(mx, amx::FirstLanes(valid - i), mx, _mm512_mul_ps(_mm512_loadu_ps(sr + i), sc));
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
      if (m_new == kNegInf) {  // no key yet for this row
        std::memset(pr, 0, static_cast<size_t>(kn32) * 2);
        continue;
      }
      const __m512 mv = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < kn32; i += 16) {
        const __m512 e = _mm512_maskz_mov_ps(amx::FirstLanes(valid - i), amx::Exp16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + i), sc, mv)));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
      }
      const float factor = m[r] == kNegInf ? 0.0f : VecExpF(m[r] - m_new);
      l[r] = l[r] * factor + _mm512_reduce_add_ps(sum);
      m[r] = m_new;
      if (factor != 1.0f) {
        const __m512 f = _mm512_set1_ps(factor);
        for (int64_t d = 0; d < Dv; d += 16) _mm512_storeu_ps(o + r * Dv + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * Dv + d), f));
      }
    }
    for (int64_t rb = 0; rb < Rp / 16; ++rb) {  // O += P V
      for (int64_t vs = 0; vs < vs_n; ++vs) {
        float* ot = o + rb * 16 * Dv + vs * 16;
        _tile_loadd(0, ot, Dv * 4);
        for (int64_t c = 0; c < kn32 / 32; ++c) {
          _tile_loadd(1, p + rb * 16 * kPfKeys + c * 32, kPfKeys * 2);
          _tile_loadd(2, vt + ((k0 / 32 + c) * vs_n + vs) * 512, 64);
          _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, ot, Dv * 4);
      }
    }
  }
  amx::Release();
}
#else
constexpr bool kHaveAmxPrefill = false;
constexpr int64_t kPfRows = 64;
OMNI_INLINE bool AmxPrefillFits(int64_t, int64_t, int64_t) { return false; }
OMNI_INLINE int64_t PackedKeyElems(int64_t, int64_t, int64_t) { return 0; }
template <typename Src>
inline void PackKeys(const Src&, int64_t, int64_t, int64_t, uint16_t*) {}
inline void AmxPrefillTile(const uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int64_t,
                           const uint16_t*, int64_t, int64_t, float, float*, float*) {}
#endif

}  // namespace attn
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
