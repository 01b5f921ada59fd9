// 8-lane fp32 vectors with loads/stores from float, half and bfloat16 storage: the host's vector unit for
// the fused loops of the kernels. GCC vectorises plain float loops well but not the 32->16-bit narrowing of
// bf16 rounding or _Float16 conversions, which made the bf16/fp16 paths 3-5x slower than fp32. With AVX2
// (and F16C) these map to a handful of instructions; the generic library gets the same API as scalar loops.
#pragma once
#include "host/kernel_operator.h"

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define OMNI_SIMD_AVX2 1
#endif
#if defined(OMNI_SIMD_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define OMNI_SIMD_AVX512 1
// GCC 12's AVX-512 headers start several intrinsics from _mm512_undefined_*(), which -Wmaybe-uninitialized
// reports at every inlined use; the values are fully written.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace AscendC {
inline namespace OMNI_ISA_NS {
namespace simd {

#ifdef OMNI_SIMD_AVX2
struct V8 {
  __m256 v;
};
OMNI_INLINE V8 Set1(float x) { return {_mm256_set1_ps(x)}; }
OMNI_INLINE V8 Add(V8 a, V8 b) { return {_mm256_add_ps(a.v, b.v)}; }
OMNI_INLINE V8 Mul(V8 a, V8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
OMNI_INLINE V8 Fma(V8 a, V8 b, V8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
OMNI_INLINE float Sum(V8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

OMNI_INLINE V8 Load(const float* p) { return {_mm256_loadu_ps(p)}; }
OMNI_INLINE V8 Load(const half* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
OMNI_INLINE V8 Load(const bfloat16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}

OMNI_INLINE void Store(float* p, V8 x) { _mm256_storeu_ps(p, x.v); }
OMNI_INLINE void Store(half* p, V8 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Round to nearest even, as FromFloat<bfloat16_t>; NaNs stay (quiet) NaNs.
OMNI_INLINE __m256i Bf16Bits(V8 x) {
  const __m256i u = _mm256_castps_si256(x.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rnd = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256 unord = _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rnd, nan, _mm256_castps_si256(unord));
}
OMNI_INLINE void Store(bfloat16_t* p, V8 x) {
  const __m256i b = Bf16Bits(x);
  // values are < 2^16, so unsigned-saturating packing is exact
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}
// Store x to p (rounded to T) and return the rounded value as fp32, rounding once.
OMNI_INLINE V8 StoreRound(float* p, V8 x) {
  Store(p, x);
  return x;
}
OMNI_INLINE V8 StoreRound(half* p, V8 x) {
  const __m128i h = _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  return {_mm256_cvtph_ps(h)};
}
OMNI_INLINE V8 StoreRound(bfloat16_t* p, V8 x) {
  const __m256i b = Bf16Bits(x);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(b, 16))};
}
// T(x) back as fp32: the value a store to T followed by a load would give.
OMNI_INLINE V8 Round(V8 x, const float*) { return x; }
OMNI_INLINE V8 Round(V8 x, const half*) {
  return {_mm256_cvtph_ps(_mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))};
}
OMNI_INLINE V8 Round(V8 x, const bfloat16_t*) { return {_mm256_castsi256_ps(_mm256_slli_epi32(Bf16Bits(x), 16))}; }

#endif

#ifdef OMNI_SIMD_AVX512
// 16 lanes for the avx512 / amx libraries: bandwidth-bound loops (norms) retire half the instructions, and the
// bf16 narrowing is one vcvtneps2bf16 (round to nearest even, as FromFloat; NaNs stay NaN; like every AVX512-BF16
// conversion it treats fp32 denormal inputs as zero) instead of AVX2's seven-instruction integer rounding.
struct V16 {
  __m512 v;
};
OMNI_INLINE V16 Set1W(float x) { return {_mm512_set1_ps(x)}; }
OMNI_INLINE V16 Add(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
OMNI_INLINE V16 Mul(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
OMNI_INLINE V16 Fma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
// Once per row: through memory (GCC 12's _mm512_reduce_add_ps trips -Wmaybe-uninitialized in its header).
OMNI_INLINE float Sum(V16 a) {
  alignas(64) float t[16];
  _mm512_store_ps(t, a.v);
  for (int w = 8; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}
OMNI_INLINE V16 LoadW(const float* p) { return {_mm512_loadu_ps(p)}; }
OMNI_INLINE V16 LoadW(const half* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
OMNI_INLINE V16 Bf16ToF32(__m256i b) { return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16))}; }
OMNI_INLINE V16 LoadW(const bfloat16_t* p) { return Bf16ToF32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
OMNI_INLINE __m256i Bf16Bits(V16 x) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x.v)); }
OMNI_INLINE __m256i F16Bits(V16 x) { return _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
OMNI_INLINE void Store(float* p, V16 x) { _mm512_storeu_ps(p, x.v); }
OMNI_INLINE void Store(half* p, V16 x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), F16Bits(x)); }
OMNI_INLINE void Store(bfloat16_t* p, V16 x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), Bf16Bits(x)); }
OMNI_INLINE V16 StoreRound(float* p, V16 x) {
  Store(p, x);
  return x;
}
OMNI_INLINE V16 StoreRound(half* p, V16 x) {
  const __m256i h = F16Bits(x);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  return {_mm512_cvtph_ps(h)};
}
OMNI_INLINE V16 StoreRound(bfloat16_t* p, V16 x) {
  const __m256i b = Bf16Bits(x);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b);
  return Bf16ToF32(b);
}
OMNI_INLINE V16 Round(V16 x, const float*) { return x; }
OMNI_INLINE V16 Round(V16 x, const half*) { return {_mm512_cvtph_ps(F16Bits(x))}; }
OMNI_INLINE V16 Round(V16 x, const bfloat16_t*) { return Bf16ToF32(Bf16Bits(x)); }
// The widest vector of this library: VW / kW, with LoadW / Set1W (Load / Set1 stay the 8-lane ones).
using VW = V16;
constexpr int kW = 16;
#endif

#ifndef OMNI_SIMD_AVX2  // portable fallback: the same operations on 8 floats
struct V8 {
  float v[8];
};
OMNI_INLINE V8 Set1(float x) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = x;
  return r;
}
OMNI_INLINE V8 Add(V8 a, V8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
  return a;
}
OMNI_INLINE V8 Mul(V8 a, V8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i];
  return a;
}
OMNI_INLINE V8 Fma(V8 a, V8 b, V8 c) {
  for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
OMNI_INLINE float Sum(V8 a) {
  float s = 0;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}
template <typename T>
OMNI_INLINE V8 Load(const T* p) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = ToFloat(p[i]);
  return r;
}
template <typename T>
OMNI_INLINE void Store(T* p, V8 x) {
  for (int i = 0; i < 8; ++i) p[i] = FromFloat<T>(x.v[i]);
}
template <typename T>
OMNI_INLINE V8 StoreRound(T* p, V8 x) {
  for (int i = 0; i < 8; ++i) {
    p[i] = FromFloat<T>(x.v[i]);
    x.v[i] = ToFloat(p[i]);
  }
  return x;
}
template <typename T>
OMNI_INLINE V8 Round(V8 x, const T*) {
  for (int i = 0; i < 8; ++i) x.v[i] = ToFloat(FromFloat<T>(x.v[i]));
  return x;
}
#endif

#ifndef OMNI_SIMD_AVX512  // the widest vector is the 8-lane one (AVX2 or the fallback)
using VW = V8;
constexpr int kW = 8;
template <typename T>
OMNI_INLINE V8 LoadW(const T* p) { return Load(p); }
OMNI_INLINE V8 Set1W(float x) { return Set1(x); }
#endif

}  // namespace simd
}  // namespace OMNI_ISA_NS
}  // namespace AscendC
