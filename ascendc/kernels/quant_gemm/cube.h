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


// Sums the L lanes of the stored accumulators: t[2i + j] holds (row i, weight row j).
template <int MR, int NR, int L>
OMNI_INLINE void ReduceLanes(const int32_t (&t)[MR * 2][16], int32_t (&r)[MR][NR]) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      int32_t s = 0;
      for (int l = 0; l < L; ++l) s += t[2 * i + j][l];
      r[i][j] = s;
    }
}

// r[i][j] = sum_k a[i*lda + k] * w[j*ldw + k] for k < K (overwrites r). MR <= 4, NR <= 2.
// Codegen notes (GCC 12): the accumulators are named variables and are stored to memory after the loop before
// the horizontal sums. An array of vectors, or shuffles on the accumulators right after the loop, make GCC add
// a register copy per accumulator per iteration (8 extra uops on 18).
#define OMNI_I8_ROWS(ROW)                 \
  ROW(0, c00, c01)                        \
  if constexpr (MR > 1) ROW(1, c10, c11)  \
  if constexpr (MR > 2) ROW(2, c20, c21)  \
  if constexpr (MR > 3) ROW(3, c30, c31)
template <int MR, int NR>
OMNI_INLINE void DotI8(const int16_t* a, int64_t lda, const int8_t* w, int64_t ldw, int64_t K, int32_t (&r)[MR][NR]) {
  static_assert(MR >= 1 && MR <= 4 && NR >= 1 && NR <= 2, "cube tile");
  int64_t k = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
            c31 = c00;
    for (; k + 32 <= K; k += 32) {
      const __m512i b0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
      __m512i b1 = b0;
      if constexpr (NR > 1) b1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + ldw + k)));
#define OMNI_ROW(i, ca, cb)                                                                  \
  {                                                                                          \
    const __m512i av = _mm512_loadu_si512(reinterpret_cast<const void*>(a + (i) * lda + k)); \
    ca = _mm512_dpwssd_epi32(ca, av, b0);                                                    \
    if constexpr (NR > 1) cb = _mm512_dpwssd_epi32(cb, av, b1);                              \
  }
      OMNI_I8_ROWS(OMNI_ROW)
#undef OMNI_ROW
    }
    alignas(64) int32_t t[MR * 2][16];
#define OMNI_ROW(i, ca, cb)                                                          \
  {                                                                                  \
    _mm512_store_si512(reinterpret_cast<void*>(t[2 * (i)]), ca);                     \
    if constexpr (NR > 1) _mm512_store_si512(reinterpret_cast<void*>(t[2 * (i) + 1]), cb); \
  }
    OMNI_I8_ROWS(OMNI_ROW)
#undef OMNI_ROW
    ReduceLanes<MR, NR, 16>(t, r);
  }
#elif defined(__AVX2__)
  {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
            c31 = c00;
    const int64_t kv = K & ~int64_t{15};
    for (int64_t kk = 0; kk < kv; kk += 16) {
      const int64_t k = kk;  // NOLINT: shadows the tail's k on purpose (a fresh induction variable)
      const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
      __m256i b1 = b0;
      if constexpr (NR > 1) b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + ldw + k)));
#define OMNI_ROW(i, ca, cb)                                                                       \
  {                                                                                               \
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + (i) * lda + k));   \
    ca = _mm256_add_epi32(ca, _mm256_madd_epi16(av, b0));                                         \
    if constexpr (NR > 1) cb = _mm256_add_epi32(cb, _mm256_madd_epi16(av, b1));                   \
  }
      OMNI_I8_ROWS(OMNI_ROW)
#undef OMNI_ROW
    }
    alignas(64) int32_t t[MR * 2][16];
#define OMNI_ROW(i, ca, cb)                                                                   \
  {                                                                                           \
    _mm256_store_si256(reinterpret_cast<__m256i*>(t[2 * (i)]), ca);                           \
    if constexpr (NR > 1) _mm256_store_si256(reinterpret_cast<__m256i*>(t[2 * (i) + 1]), cb); \
  }
    OMNI_I8_ROWS(OMNI_ROW)
#undef OMNI_ROW
    ReduceLanes<MR, NR, 8>(t, r);
    k = kv;
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
#undef OMNI_I8_ROWS

// 8 floats as one value: inlined everywhere, so the generic library's "AVX vector return" ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));

OMNI_INLINE v8f LoadV8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
OMNI_INLINE float HSumF(const v8f& v) {
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

// ---- weight decoders -------------------------------------------------------------------------------------
// (GCC 12 scalarises __builtin_convertvector from uint8 vectors, so the vector paths use AVX2 intrinsics; the
// generic library runs the scalar loops.)

// float8_e4m3fn -> fp32 for all 256 bit patterns (exact; 0x7F/0xFF are NaN, there is no inf): the K tails and
// the generic library.
inline const float* Fp8Lut() {
  static const struct Lut {
    float v[256];
    Lut() {
      for (int b = 0; b < 256; ++b) {
        const int e = (b >> 3) & 15, m = b & 7;
        float f;
        if (e == 15 && m == 7) {
          f = __builtin_nanf("");
        } else if (e == 0) {
          f = std::ldexp(static_cast<float>(m), -9);  // subnormal: m/8 * 2^-6
        } else {
          f = std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
        }
        v[b] = (b & 0x80) ? -f : f;
      }
    }
  } lut;
  return lut.v;
}

// dst[k] = e4m3(p[k]) * s for k < 16, exact. AVX2: the e4m3 bits shifted into a binary16 (fp16 has one more
// exponent bit and bias 15 = 7 + 8, and its subnormals line up with e4m3's) give value * 2^-8 for every finite
// code, subnormals included; F16C widens to fp32 and the 2^8 folds into the scale. 0x7F/0xFF become NaN as in
// the table. Generic library: the table.
OMNI_INLINE void E4m3x16(const uint8_t* p, float s, float* dst) {
#if defined(__AVX2__) && defined(__F16C__)
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi16(0x7F));
  __m256i h = _mm256_or_si256(_mm256_slli_epi16(mag, 7), _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8));
  h = _mm256_blendv_epi8(h, _mm256_set1_epi16(0x7E00), _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F)));
  const __m256 sv = _mm256_set1_ps(s * 256.0f);
  _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), sv));
  _mm256_storeu_ps(dst + 8, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), sv));
#else
  const float* lut = Fp8Lut();
  for (int k = 0; k < 16; ++k) dst[k] = lut[p[k]] * s;
#endif
}

// 16 packed int4 bytes (32 codes, low nibble = even k) -> fp32 (code - z) * s in the kernels' permuted K order:
// dst[j] = k 2j (low nibbles), dst[16 + j] = k 2j+1 (high nibbles). x is widened in the same order, so the
// dot product is unchanged and the decode needs no interleaving shuffles.
OMNI_INLINE void Int4x32(const uint8_t* p, float z, float s, float* dst) {
#if defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m4 = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
  const __m256 zv = _mm256_set1_ps(z), sv = _mm256_set1_ps(s);
  auto put = [&](__m128i v8, float* d) {
    _mm256_storeu_ps(d, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v8)), zv), sv));
  };
  put(lo, dst);
  put(_mm_srli_si128(lo, 8), dst + 8);
  put(hi, dst + 16);
  put(_mm_srli_si128(hi, 8), dst + 24);
#else
  for (int j = 0; j < 16; ++j) {
    dst[j] = (static_cast<float>(p[j] & 15) - z) * s;
    dst[16 + j] = (static_cast<float>(p[j] >> 4) - z) * s;
  }
#endif
}

}  // namespace cube
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
