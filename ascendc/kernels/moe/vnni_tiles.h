// The prepacked tile layouts (OMNI_W_TILES_BF16 / OMNI_W_TILES_I8) computed with AVX-512 dot-product
// instructions where the CPU has no AMX (the avx512 library: AMD Zen 4/5, Intel Cooper Lake / Ice Lake).
//
// The layouts were made for AMX, but they are exactly what vdpbf16ps (AVX512-BF16) and vpdpbusd (AVX512-VNNI)
// want too: a B tile row is one zmm of 16 output columns x one 32-bit K group (a bf16 pair or 4 int8), and an A
// tile row holds 16 such groups of one token. So C[r][n] += dot(A[r][g], B[g][n]) is one broadcast of A's
// group times a B row: an outer product with no horizontal sums and no conversions, 32 bf16 MACs (64 int8) per
// instruction. The callers (moe_tiles.h, w8a8_tiles.h) are the AMX ones; only TileRows differs, and unlike AMX
// it computes just the rows that exist (AMX computes whole 16-row tiles; decode has 1-3 rows per expert).
//
// int8: vpdpbusd multiplies unsigned by signed bytes, so the staged activations are x + 128 (StageI8 flips the
// sign bit where kI8Unsigned) and each column's sum of weights times 128 is taken off again: exact int32, the
// same sums as AMX's tdpbssd and the row-major kernel (wrap-around arithmetic cancels).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "host/kernel_operator.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace amx {
using namespace AscendC;

constexpr bool kI8Unsigned = true;  // StageI8 stores x ^ 0x80 (= x + 128 as unsigned) for vpdpbusd
#ifndef OMNI_VNNI_ROWS
#define OMNI_VNNI_ROWS 8
#endif
constexpr int kVnniRows = OMNI_VNNI_ROWS;  // token rows per register block: 2 accumulators each + 2 B rows + 1 broadcast

#ifndef OMNI_VNNI_PREFETCH
#define OMNI_VNNI_PREFETCH 2
#endif
constexpr int64_t kVnniPrefetch = OMNI_VNNI_PREFETCH;  // K tiles ahead that the first row group prefetches B

inline void LoadConfig() {}
inline void Release() {}

// K tiles per pass when several row groups share the B tiles: the pass's 2 x 16 KiB of B stay in L1 (Zen 5:
// 48 KiB) while every row group goes over them.
constexpr int64_t kKPass = 16;

// C[r * 32 + 0:16] (+)= sum over K tiles [kb0, kb1) of A row r against B column block b0 (16:32 against b1),
// r < MR. a_row[r]: the row's bytes in K tile 0 (tile kb at + kb * 1024). first: store, else add to C.
// lead: the pass's first row group, which reads B from memory (and prefetches it) and, for int8, computes comp
// [32] = 128 x the columns' weight sums over these K tiles; the other groups reuse comp. pf_next > 0: prefetch
// B pf_next tiles ahead (the next pass) into L2, up to tile kb_end, so the next pass's lead does not wait.
template <int MR, bool kI8>
OMNI_INLINE void VnniRows(const char* const* a_row, const char* b0, const char* b1, int64_t kb0, int64_t kb1,
                          float* c, bool first, bool lead, int32_t* comp, int64_t pf_next, int64_t kb_end) {
  __m512 f0[MR], f1[MR];
  __m512i i0[MR], i1[MR];
  __m512i s0 = _mm512_setzero_si512(), s1 = s0;  // int8: the columns' weight sums (for the +128 of A)
  const __m512i ones = _mm512_set1_epi8(1);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    f0[r] = f1[r] = _mm512_setzero_ps();
    i0[r] = i1[r] = _mm512_setzero_si512();
  }
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const char* p0 = b0 + kb * 1024;
    const char* p1 = b1 + kb * 1024;
    if (lead && kb + kVnniPrefetch < kb1) {
      for (int l = 0; l < 1024; l += 64) {
        _mm_prefetch(p0 + kVnniPrefetch * 1024 + l, _MM_HINT_T0);
        _mm_prefetch(p1 + kVnniPrefetch * 1024 + l, _MM_HINT_T0);
      }
    }
    if (pf_next > 0 && kb + pf_next < kb_end) {
      for (int l = 0; l < 1024; l += 64) {
        _mm_prefetch(p0 + pf_next * 1024 + l, _MM_HINT_T1);
        _mm_prefetch(p1 + pf_next * 1024 + l, _MM_HINT_T1);
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < 16; ++g) {
      const __m512i w0 = _mm512_loadu_si512(p0 + g * 64), w1 = _mm512_loadu_si512(p1 + g * 64);
      if (kI8 && lead) {
        s0 = _mm512_dpbusd_epi32(s0, ones, w0);
        s1 = _mm512_dpbusd_epi32(s1, ones, w1);
      }
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        int32_t bits;
        __builtin_memcpy(&bits, a_row[r] + kb * 1024 + g * 4, 4);
        const __m512i av = _mm512_set1_epi32(bits);
        if constexpr (kI8) {
          i0[r] = _mm512_dpbusd_epi32(i0[r], av, w0);
          i1[r] = _mm512_dpbusd_epi32(i1[r], av, w1);
        } else {
          f0[r] = _mm512_dpbf16_ps(f0[r], reinterpret_cast<__m512bh>(av), reinterpret_cast<__m512bh>(w0));
          f1[r] = _mm512_dpbf16_ps(f1[r], reinterpret_cast<__m512bh>(av), reinterpret_cast<__m512bh>(w1));
        }
      }
    }
  }
  if constexpr (kI8) {
    if (lead) {
      s0 = _mm512_slli_epi32(s0, 7);
      s1 = _mm512_slli_epi32(s1, 7);
      _mm512_storeu_si512(comp, s0);
      _mm512_storeu_si512(comp + 16, s1);
    } else {
      s0 = _mm512_loadu_si512(comp);
      s1 = _mm512_loadu_si512(comp + 16);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * 32;
    if constexpr (kI8) {
      __m512i v0 = _mm512_sub_epi32(i0[r], s0), v1 = _mm512_sub_epi32(i1[r], s1);
      if (!first) {
        v0 = _mm512_add_epi32(v0, _mm512_loadu_si512(cr));
        v1 = _mm512_add_epi32(v1, _mm512_loadu_si512(cr + 16));
      }
      _mm512_storeu_si512(cr, v0);
      _mm512_storeu_si512(cr + 16, v1);
    } else {
      __m512 v0 = f0[r], v1 = f1[r];
      if (!first) {
        v0 = _mm512_add_ps(v0, _mm512_loadu_ps(cr));
        v1 = _mm512_add_ps(v1, _mm512_loadu_ps(cr + 16));
      }
      _mm512_storeu_ps(cr, v0);
      _mm512_storeu_ps(cr + 16, v1);
    }
  }
}

// VnniRows for a group of n rows (1 <= n <= M): one instance per row count up to kVnniRows.
template <bool kI8, int M = kVnniRows>
OMNI_INLINE void VnniGroup(int64_t n, const char* const* a_row, const char* b0, const char* b1, int64_t kb0,
                           int64_t kb1, float* c, bool first, bool lead, int32_t* comp, int64_t pf_next,
                           int64_t kb_end) {
  if constexpr (M > 1) {
    if (n < M) return VnniGroup<kI8, M - 1>(n, a_row, b0, b1, kb0, kb1, c, first, lead, comp, pf_next, kb_end);
  }
  VnniRows<M, kI8>(a_row, b0, b1, kb0, kb1, c, first, lead, comp, pf_next, kb_end);
}

// Same contract as the AMX TileRows (amx_tiles.h): C[r][0:32] for the `rows` (1..256) rows of blocked A (starting
// at a 16-row block, kb_n K tiles per block) against column blocks b0 (C columns 0-15) and b1 (16-31). Rows past
// `rows` are left untouched.
template <bool kI8 = false>
OMNI_INLINE void TileRows(const uint16_t* a, int64_t kb_n, int64_t rows, const uint16_t* b0, const uint16_t* b1,
                          float* c) {
  const char* abytes = reinterpret_cast<const char*>(a);
  const int64_t blk_bytes = kb_n * 1024;  // one 16-row block of A
  const int64_t pass = rows <= kVnniRows ? kb_n : kKPass;
  const char* w0 = reinterpret_cast<const char*>(b0);
  const char* w1 = reinterpret_cast<const char*>(b1);
  alignas(64) int32_t comp[32];
  for (int64_t k0 = 0; k0 < kb_n; k0 += pass) {
    const int64_t k1 = k0 + pass < kb_n ? k0 + pass : kb_n;
    for (int64_t r0 = 0; r0 < rows; r0 += kVnniRows) {
      const int64_t n = rows - r0 < kVnniRows ? rows - r0 : kVnniRows;
      const char* a_row[kVnniRows];
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = r0 + i;
        a_row[i] = abytes + (r / 16) * blk_bytes + (r % 16) * 64;
      }
      VnniGroup<kI8>(n, a_row, w0, w1, k0, k1, c + r0 * 32, k0 == 0, r0 == 0, comp, r0 == kVnniRows ? pass : 0,
                     kb_n);
    }
  }
}

// C[16][16] fp32 (row stride 16) = sum over kb_n K tiles of A (16 bf16 rows `lda` bytes apart, K tile kb at
// + 64 kb bytes) times the packed B tiles b (tile kb at + 1024 kb bytes): what AMX's tile loads of a row-strided
// A and tdpbf16ps compute (decode attention's scores: 16 cached keys times Q^T, amx_attention.h).
OMNI_INLINE void TileProduct16(const char* a, int64_t lda, const char* b, int64_t kb_n, float* c) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < kb_n; ++kb) {
#pragma GCC unroll 2
    for (int g = 0; g < 16; ++g) {
      const __m512bh w = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + kb * 1024 + g * 64));
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        int32_t bits;
        __builtin_memcpy(&bits, a + r * lda + kb * 64 + g * 4, 4);
        acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<__m512bh>(_mm512_set1_epi32(bits)), w);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) _mm512_storeu_ps(c + r * 16, acc[r]);
}

}  // namespace amx
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
