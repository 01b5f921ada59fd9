// The "cube" inner loops of the quantized GEMMs: small MR x NR tiles of dot products along K, with the
// accumulators in registers (the L0C of the NPU's cube unit) and both operands streamed from the Unified
// Buffer / cache. Two flavours:
//   * DotI8:  int16 (widened activations) x int8 (weights, widened in registers) -> int32, exact.
//     AVX2: vpmovsxbw + vpmaddwd + vpaddd (16 MACs per pair). AVX512-VNNI (avx512 library only): vpdpwssd on
//     512-bit vectors (32 MACs per instruction, madd and add fused). Generic: plain loops (SSE2 pmaddwd).
//   * DotF32: fp32 x fp32 -> fp32 with 8-lane partial sums (GCC vector extensions: AVX2 FMA in the avx2/avx512
//     libraries, SSE pairs in the generic one).
// Intrinsics appear only under ISA guards, so each per-ISA library contains only its own instructions.
#pragma once
#include "host/kernel_operator.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace cube {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define OMNI_QGEMM_I8_PATH "avx512-vnni"
#elif defined(__AVX2__)
#define OMNI_QGEMM_I8_PATH "avx2"
#else
#define OMNI_QGEMM_I8_PATH "scalar"
#endif

#if defined(__AVX2__)
OMNI_INLINE int32_t HSum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// r[i][j] = sum_k a[i*lda + k] * w[j*ldw + k] for k < K (overwrites r).
template <int MR, int NR>
OMNI_INLINE void DotI8(const int16_t* a, int64_t lda, const int8_t* w, int64_t ldw, int64_t K, int32_t (&r)[MR][NR]) {
  int64_t k = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  {
    __m512i c[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) c[i][j] = _mm512_setzero_si512();
    for (; k + 32 <= K; k += 32) {
      __m512i b[NR];
      for (int j = 0; j < NR; ++j)
        b[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * ldw + k)));
      for (int i = 0; i < MR; ++i) {
        const __m512i av = _mm512_loadu_si512(reinterpret_cast<const void*>(a + i * lda + k));
        for (int j = 0; j < NR; ++j) c[i][j] = _mm512_dpwssd_epi32(c[i][j], av, b[j]);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) r[i][j] = _mm512_reduce_add_epi32(c[i][j]);
  }
#elif defined(__AVX2__)
  {
    __m256i c[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) c[i][j] = _mm256_setzero_si256();
    for (; k + 16 <= K; k += 16) {
      __m256i b[NR];
      for (int j = 0; j < NR; ++j)
        b[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * ldw + k)));
      for (int i = 0; i < MR; ++i) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * lda + k));
        for (int j = 0; j < NR; ++j) c[i][j] = _mm256_add_epi32(c[i][j], _mm256_madd_epi16(av, b[j]));
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) r[i][j] = HSum256(c[i][j]);
  }
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) r[i][j] = 0;
#endif
  if (k < K) {  // tail (and the whole loop in the generic library): int32 sums the compiler vectorises
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) {
        const int16_t* ap = a + i * lda;
        const int8_t* wp = w + j * ldw;
        int32_t s = 0;
        for (int64_t kk = k; kk < K; ++kk) s += static_cast<int32_t>(ap[kk]) * static_cast<int32_t>(wp[kk]);
        r[i][j] += s;
      }
  }
}

// 8 floats as one value: inlined everywhere, so the generic library's "AVX vector return" ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));

OMNI_INLINE v8f LoadV8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
OMNI_INLINE float HSumF(v8f v) {
  // Fixed pairwise order: the result does not depend on the ISA's vector width.
  float a = (v[0] + v[4]) + (v[2] + v[6]);
  float b = (v[1] + v[5]) + (v[3] + v[7]);
  return a + b;
}

// acc[i*ldc + j] += sum_k x[i*lda + k] * w[j*ldw + k] for k < K.
template <int MR, int NR>
OMNI_INLINE void DotF32(const float* x, int64_t lda, const float* w, int64_t ldw, int64_t K, float* acc,
                        int64_t ldc) {
  v8f c[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i][j] = v8f{};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    v8f b[NR];
    for (int j = 0; j < NR; ++j) b[j] = LoadV8(w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const v8f av = LoadV8(x + i * lda + k);
      for (int j = 0; j < NR; ++j) c[i][j] += av * b[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = HSumF(c[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * lda + kk] * w[j * ldw + kk];
      acc[i * ldc + j] += s;
    }
}

}  // namespace cube
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
