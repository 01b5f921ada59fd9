// A host-CPU implementation of the subset of Ascend C's programming model that omniops kernels use.
// The names and argument orders mirror CANN's kernel_operator.h so the kernel sources under ascendc/kernels/
// read like (and are meant to compile as) Ascend C; the semantics on the host are documented in
// ascendc/README.md. In short:
//   * a launch runs blocks 0..GetBlockNum()-1 on the host runtime's thread pool, one block per task;
//   * "global memory" is ordinary memory; "local memory" (the Unified Buffer, UB) is a per-thread arena of
//     kUBSize bytes handed out by TPipe::InitBuffer, so tiling decisions match the NPU's budget;
//   * DataCopy is memcpy; queues (TQue) are FIFOs of buffers, EnQue/DeQue only pass ownership (the copy is
//     synchronous, so the pipeline barriers that order MTE2/V/MTE3 on the NPU are no-ops here);
//   * vector instructions are plain loops over `count` elements, compiled once per ISA level (AVX2, AVX-512)
//     and auto-vectorised; each translation unit that includes this header is built into its own shared
//     library per ISA (see CMakeLists.txt), never mixed in one object.
// Unlike the NPU, DataCopy and vector ops accept any count (no 32-byte alignment rule); kernels that must
// also run on CANN use counts padded to 32 bytes (see AlignUp) where the NPU requires it.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "omni/kernel_abi.h"

#define __global__
#define __aicore__
#define __gm__
#define GM_ADDR uint8_t*

#if defined(__GNUC__)
#define OMNI_INLINE inline __attribute__((always_inline))
#define OMNI_RESTRICT __restrict__
#else
#define OMNI_INLINE inline
#define OMNI_RESTRICT
#endif

// Each ISA library gets its own inline namespace, so even an accidental cross-library symbol clash cannot
// bind AVX-512 code into the AVX2 library.
#ifndef OMNI_ISA_NS
#define OMNI_ISA_NS generic
#endif

namespace AscendC {
inline namespace OMNI_ISA_NS {

using half = _Float16;

// bfloat16 storage type: conversion to float is a shift; to bf16 rounds to nearest even (NaN stays NaN).
struct bfloat16_t {
  uint16_t bits;
};

OMNI_INLINE float ToFloat(float v) { return v; }
OMNI_INLINE float ToFloat(half v) { return static_cast<float>(v); }
OMNI_INLINE float ToFloat(bfloat16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
template <typename T>
OMNI_INLINE T FromFloat(float v);
template <>
OMNI_INLINE float FromFloat<float>(float v) { return v; }
template <>
OMNI_INLINE half FromFloat<half>(float v) { return static_cast<half>(v); }
template <>
OMNI_INLINE bfloat16_t FromFloat<bfloat16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  // Branch-free round-to-nearest-even; a NaN keeps a quiet-NaN payload bit so it cannot round to inf.
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return bfloat16_t{static_cast<uint16_t>(is_nan ? nan : rounded)};
}

enum class TPosition { GM, VECIN, VECOUT, VECCALC, A1, A2, B1, B2, CO1, CO2 };
using QuePosition = TPosition;
enum class RoundMode { CAST_NONE, CAST_RINT, CAST_ROUND, CAST_FLOOR, CAST_CEIL, CAST_TRUNC };
enum pipe_t { PIPE_S, PIPE_V, PIPE_MTE2, PIPE_MTE3, PIPE_M, PIPE_ALL };

constexpr uint32_t kUBSize = OMNI_UB_BYTES;  // Unified Buffer per AI core on Ascend 910B
constexpr uint32_t kBlockBytes = 32;      // the NPU's DataCopy granularity

OMNI_INLINE constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
OMNI_INLINE constexpr int64_t AlignUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

// ---- dtype dispatch ------------------------------------------------------------------------------------
// The one dispatch from an OmniDType code to a storage type for every kernel entry point: runs the statement
// `__VA_ARGS__` with `T` bound to float, half or bfloat16_t (the bindings only pass these three codes).
// Nests: OMNI_DISPATCH_FLOAT(a->dtype, T, OMNI_DISPATCH_FLOAT(a->cache_dtype, C, Run<T, C>(a, rt))).
#define OMNI_DISPATCH_FLOAT(dtype, T, ...)    \
  switch (dtype) {                            \
    case OMNI_F32: {                          \
      using T = float;                        \
      __VA_ARGS__;                            \
    } break;                                  \
    case OMNI_F16: {                          \
      using T = ::AscendC::half;              \
      __VA_ARGS__;                            \
    } break;                                  \
    case OMNI_BF16: {                         \
      using T = ::AscendC::bfloat16_t;        \
      __VA_ARGS__;                            \
    } break;                                  \
    default:                                  \
      break;                                  \
  }

// ---- block index / grid ----------------------------------------------------------------------------
namespace detail {
struct BlockState {
  int64_t idx = 0;
  int64_t num = 1;
  alignas(64) unsigned char* ub = nullptr;  // this thread's Unified Buffer arena
  uint32_t ub_used = 0;
  ~BlockState() { std::free(ub); }
};
inline thread_local BlockState tls_block;

inline unsigned char* UBBase() {
  BlockState& s = tls_block;
  if (s.ub == nullptr) {
    s.ub = static_cast<unsigned char*>(std::aligned_alloc(64, kUBSize));
    if (s.ub == nullptr) throw std::bad_alloc();
  }
  return s.ub;
}
}  // namespace detail

OMNI_INLINE int64_t GetBlockIdx() { return detail::tls_block.idx; }
OMNI_INLINE int64_t GetBlockNum() { return detail::tls_block.num; }

template <pipe_t P>
OMNI_INLINE void PipeBarrier() {}  // copies are synchronous on the host

// ---- tensors ----------------------------------------------------------------------------------------
template <typename T>
class GlobalTensor {
 public:
  OMNI_INLINE void SetGlobalBuffer(__gm__ T* buffer, uint64_t size = 0) {
    addr_ = buffer;
    size_ = size;
  }
  OMNI_INLINE GlobalTensor operator[](uint64_t offset) const {
    GlobalTensor t;
    t.addr_ = addr_ + offset;
    t.size_ = size_ > offset ? size_ - offset : 0;
    return t;
  }
  OMNI_INLINE T GetValue(uint64_t i) const { return addr_[i]; }
  OMNI_INLINE void SetValue(uint64_t i, T v) { addr_[i] = v; }
  OMNI_INLINE T* GetPhyAddr() const { return addr_; }
  OMNI_INLINE uint64_t GetSize() const { return size_; }

 private:
  T* addr_ = nullptr;
  uint64_t size_ = 0;
};

template <typename T>
class LocalTensor {
 public:
  LocalTensor() = default;
  LocalTensor(T* addr, uint32_t size) : addr_(addr), size_(size) {}
  OMNI_INLINE LocalTensor operator[](uint32_t offset) const { return LocalTensor(addr_ + offset, size_ - offset); }
  OMNI_INLINE T GetValue(uint32_t i) const { return addr_[i]; }
  OMNI_INLINE void SetValue(uint32_t i, T v) const { addr_[i] = v; }
  OMNI_INLINE T* GetPhyAddr() const { return addr_; }
  OMNI_INLINE uint32_t GetSize() const { return size_; }
  template <typename U>
  OMNI_INLINE LocalTensor<U> ReinterpretCast() const {
    return LocalTensor<U>(reinterpret_cast<U*>(addr_), static_cast<uint32_t>(size_ * sizeof(T) / sizeof(U)));
  }

 private:
  T* addr_ = nullptr;
  uint32_t size_ = 0;
};

// ---- pipe, queues, buffers --------------------------------------------------------------------------
// A queue owns `num` buffers of `len` bytes carved from the UB. AllocTensor hands out the next free one,
// EnQue/DeQue move it from producer to consumer, FreeTensor returns it. Depth 2 = double buffering on the NPU;
// on the host the stages run back to back, so depth only changes how much UB the kernel reserves.
template <TPosition POS, int32_t DEPTH>
class TQue {
 public:
  template <typename T>
  OMNI_INLINE LocalTensor<T> AllocTensor() {
    unsigned char* p = base_ + static_cast<size_t>(next_alloc_ % num_) * len_;
    ++next_alloc_;
    return LocalTensor<T>(reinterpret_cast<T*>(p), len_ / sizeof(T));
  }
  template <typename T>
  OMNI_INLINE void EnQue(const LocalTensor<T>& t) {
    fifo_[tail_++ % kMaxBufs] = t.GetPhyAddr();
  }
  template <typename T>
  OMNI_INLINE LocalTensor<T> DeQue() {
    void* p = fifo_[head_++ % kMaxBufs];
    return LocalTensor<T>(static_cast<T*>(p), len_ / sizeof(T));
  }
  template <typename T>
  OMNI_INLINE void FreeTensor(const LocalTensor<T>&) {}

 private:
  friend class TPipe;
  static constexpr int kMaxBufs = 8;
  unsigned char* base_ = nullptr;
  uint32_t num_ = 1, len_ = 0;
  uint32_t next_alloc_ = 0, head_ = 0, tail_ = 0;
  void* fifo_[kMaxBufs] = {};
};

template <TPosition POS = TPosition::VECCALC>
class TBuf {
 public:
  template <typename T>
  OMNI_INLINE LocalTensor<T> Get() const {
    return LocalTensor<T>(reinterpret_cast<T*>(base_), len_ / sizeof(T));
  }

 private:
  friend class TPipe;
  unsigned char* base_ = nullptr;
  uint32_t len_ = 0;
};

// Hands out UB space. One TPipe per kernel instance; construction resets the arena, exceeding kUBSize aborts
// (a tiling bug, never an input error: the host launcher sizes tiles from kUBSize).
class TPipe {
 public:
  TPipe() { detail::tls_block.ub_used = 0; }
  template <TPosition POS, int32_t DEPTH>
  void InitBuffer(TQue<POS, DEPTH>& que, uint32_t num, uint32_t len) {
    len = static_cast<uint32_t>(AlignUp(len, 64));
    que.base_ = Take(num * len);
    que.num_ = num;
    que.len_ = len;
  }
  template <TPosition POS>
  void InitBuffer(TBuf<POS>& buf, uint32_t len) {
    len = static_cast<uint32_t>(AlignUp(len, 64));
    buf.base_ = Take(len);
    buf.len_ = len;
  }
  void Reset() { detail::tls_block.ub_used = 0; }

 private:
  static unsigned char* Take(uint32_t bytes) {
    detail::BlockState& s = detail::tls_block;
    if (static_cast<uint64_t>(s.ub_used) + bytes > kUBSize) std::abort();
    unsigned char* p = detail::UBBase() + s.ub_used;
    s.ub_used += bytes;
    return p;
  }
};

// ---- data movement ----------------------------------------------------------------------------------
// Copies with vector moves instead of libc memcpy: glibc picks `rep movsb` for copies of a few KiB and up,
// which on the AMD EPYC (KVM) machines here runs 5-10x slower than plain AVX loads/stores.
OMNI_INLINE void CopyBytes(void* OMNI_RESTRICT dst, const void* OMNI_RESTRICT src, size_t n) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  size_t i = 0;
  for (; i + 64 <= n; i += 64) __builtin_memcpy(d + i, s + i, 64);
  for (; i + 8 <= n; i += 8) __builtin_memcpy(d + i, s + i, 8);
  for (; i < n; ++i) d[i] = s[i];
}
template <typename T>
OMNI_INLINE void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, uint32_t count) {
  CopyBytes(dst.GetPhyAddr(), src.GetPhyAddr(), static_cast<size_t>(count) * sizeof(T));
}
template <typename T>
OMNI_INLINE void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
  CopyBytes(dst.GetPhyAddr(), src.GetPhyAddr(), static_cast<size_t>(count) * sizeof(T));
}
template <typename T>
OMNI_INLINE void DataCopy(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
  std::memmove(dst.GetPhyAddr(), src.GetPhyAddr(), static_cast<size_t>(count) * sizeof(T));
}

// ---- staging: CopyIn / AllocOut / CopyOut -------------------------------------------------------------
// On the NPU the vector unit sees only the UB, so every kernel stages tiles: AllocTensor + DataCopy + EnQue,
// DeQue on the compute side, and the mirror image for results. The host CPU's vector unit reads and writes
// memory directly and its caches do the staging, so there these helpers hand out views of global memory and
// copy nothing (the copies would only cost bandwidth on a memory-bound op). Define OMNI_UB_STAGING to run the
// NPU's sequence on the host instead (real copies through the queues), e.g. to check a kernel's UB budget.
// A tile to compute a result into, destined for `dst`.
template <typename T, TPosition P, int32_t D>
OMNI_INLINE LocalTensor<T> AllocOut(TQue<P, D>& que, const GlobalTensor<T>& dst, uint32_t count) {
#ifdef OMNI_UB_STAGING
  (void)dst;
  (void)count;
  return que.template AllocTensor<T>();
#else
  (void)que;
  return LocalTensor<T>(dst.GetPhyAddr(), count);
#endif
}
// A tile holding `count` elements of src: AllocOut's tile for src, filled through the queue when staging.
template <typename T, TPosition P, int32_t D>
OMNI_INLINE LocalTensor<T> CopyIn(TQue<P, D>& que, const GlobalTensor<T>& src, uint32_t count) {
  LocalTensor<T> t = AllocOut(que, src, count);
#ifdef OMNI_UB_STAGING
  DataCopy(t, src, count);
  que.EnQue(t);
  t = que.template DeQue<T>();
#endif
  return t;
}
// Done with a tile from CopyIn.
template <typename T, TPosition P, int32_t D>
OMNI_INLINE void Release(TQue<P, D>& que, const LocalTensor<T>& t) {
  que.FreeTensor(t);
}
// Write a tile from AllocOut to `dst` (a no-op on the host, where it was computed in place).
template <typename T, TPosition P, int32_t D>
OMNI_INLINE void CopyOut(TQue<P, D>& que, const GlobalTensor<T>& dst, const LocalTensor<T>& t, uint32_t count) {
#ifdef OMNI_UB_STAGING
  que.EnQue(t);
  LocalTensor<T> o = que.template DeQue<T>();
  DataCopy(dst, o, count);
  que.FreeTensor(o);
#else
  (void)que;
  (void)dst;
  (void)t;
  (void)count;
#endif
}

// ---- vector unit ------------------------------------------------------------------------------------
#define OMNI_BINARY_OP(NAME, EXPR)                                                                       \
  template <typename T>                                                                                 \
  OMNI_INLINE void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1, \
                        int32_t count) {                                                                \
    T* OMNI_RESTRICT d = dst.GetPhyAddr();                                                              \
    const T* a = src0.GetPhyAddr();                                                                     \
    const T* b = src1.GetPhyAddr();                                                                     \
    for (int32_t i = 0; i < count; ++i) d[i] = (EXPR);                                                  \
  }
OMNI_BINARY_OP(Add, a[i] + b[i])
OMNI_BINARY_OP(Sub, a[i] - b[i])
OMNI_BINARY_OP(Mul, a[i] * b[i])
OMNI_BINARY_OP(Div, a[i] / b[i])
OMNI_BINARY_OP(Max, a[i] > b[i] ? a[i] : b[i])
OMNI_BINARY_OP(Min, a[i] < b[i] ? a[i] : b[i])
#undef OMNI_BINARY_OP

template <typename T>
OMNI_INLINE void Adds(const LocalTensor<T>& dst, const LocalTensor<T>& src, T scalar, int32_t count) {
  T* OMNI_RESTRICT d = dst.GetPhyAddr();
  const T* s = src.GetPhyAddr();
  for (int32_t i = 0; i < count; ++i) d[i] = s[i] + scalar;
}
template <typename T>
OMNI_INLINE void Muls(const LocalTensor<T>& dst, const LocalTensor<T>& src, T scalar, int32_t count) {
  T* OMNI_RESTRICT d = dst.GetPhyAddr();
  const T* s = src.GetPhyAddr();
  for (int32_t i = 0; i < count; ++i) d[i] = s[i] * scalar;
}
template <typename T>
OMNI_INLINE void Duplicate(const LocalTensor<T>& dst, T scalar, int32_t count) {
  T* OMNI_RESTRICT d = dst.GetPhyAddr();
  for (int32_t i = 0; i < count; ++i) d[i] = scalar;
}

// exp on the vector unit: Cody-Waite range reduction + degree-6 polynomial, ~1 ulp over the float range,
// written branch-free so that loops calling it vectorise (std::exp does not without -ffast-math).
OMNI_INLINE float VecExpF(float x) {
  x = x < -88.0f ? -88.0f : (x > 88.0f ? 88.0f : x);
  float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}
OMNI_INLINE void Exp(const LocalTensor<float>& dst, const LocalTensor<float>& src, int32_t count) {
  float* OMNI_RESTRICT d = dst.GetPhyAddr();
  const float* s = src.GetPhyAddr();
  for (int32_t i = 0; i < count; ++i) d[i] = VecExpF(s[i]);
}
// silu(x) = x / (1 + exp(-x)). For x < -88 exp saturates and the result is -0-ish, as in torch.
OMNI_INLINE void Silu(const LocalTensor<float>& dst, const LocalTensor<float>& src, int32_t count) {
  float* OMNI_RESTRICT d = dst.GetPhyAddr();
  const float* s = src.GetPhyAddr();
  for (int32_t i = 0; i < count; ++i) d[i] = s[i] / (1.0f + VecExpF(-s[i]));
}
OMNI_INLINE void Sqrt(const LocalTensor<float>& dst, const LocalTensor<float>& src, int32_t count) {
  float* OMNI_RESTRICT d = dst.GetPhyAddr();
  const float* s = src.GetPhyAddr();
  for (int32_t i = 0; i < count; ++i) d[i] = __builtin_sqrtf(s[i]);
}

// ReduceSum/ReduceMax write the result to dst[0]. `work` is the scratch the NPU needs; unused here. The sum
// uses 16 independent partial sums so it vectorises without -ffast-math (and is deterministic).
template <typename T>
OMNI_INLINE void ReduceSum(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>&,
                           int32_t count) {
  const T* s = src.GetPhyAddr();
  T acc[16] = {};
  int32_t i = 0;
  for (; i + 16 <= count; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += s[i + j];
  T total = 0;
  for (; i < count; ++i) total += s[i];
  for (int j = 0; j < 16; ++j) total += acc[j];
  dst.SetValue(0, total);
}
template <typename T>
OMNI_INLINE void ReduceMax(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>&,
                           int32_t count) {
  const T* s = src.GetPhyAddr();
  T m = count > 0 ? s[0] : T(0);
  for (int32_t i = 1; i < count; ++i) m = s[i] > m ? s[i] : m;
  dst.SetValue(0, m);
}

// Cast between storage types through float (round to nearest even on narrowing, as CAST_RINT).
template <typename D, typename S>
OMNI_INLINE void Cast(const LocalTensor<D>& dst, const LocalTensor<S>& src, RoundMode, int32_t count) {
  D* OMNI_RESTRICT d = dst.GetPhyAddr();
  const S* s = src.GetPhyAddr();
  for (int32_t i = 0; i < count; ++i) d[i] = FromFloat<D>(ToFloat(s[i]));
}

#if defined(__F16C__)
// GCC does not vectorise _Float16 conversions without AVX512-FP16; F16C does 8 at a time: cast8(d, s) converts
// elements [0, 8), a scalar loop the rest.
template <typename D, typename S, typename Cast8>
OMNI_INLINE void CastBy8(const LocalTensor<D>& dst, const LocalTensor<S>& src, int32_t count, Cast8 cast8) {
  D* OMNI_RESTRICT d = dst.GetPhyAddr();
  const S* s = src.GetPhyAddr();
  int32_t i = 0;
  for (; i + 8 <= count; i += 8) cast8(d + i, s + i);
  for (; i < count; ++i) d[i] = static_cast<D>(s[i]);
}
template <>
OMNI_INLINE void Cast<float, half>(const LocalTensor<float>& dst, const LocalTensor<half>& src, RoundMode,
                                   int32_t count) {
  CastBy8(dst, src, count, [](float* d, const half* s) {
    _mm256_storeu_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))));
  });
}
template <>
OMNI_INLINE void Cast<half, float>(const LocalTensor<half>& dst, const LocalTensor<float>& src, RoundMode,
                                   int32_t count) {
  CastBy8(dst, src, count, [](half* d, const float* s) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  });
}
#endif

// ---- host-side launch helper (what `kernel<<<blockDim, l2ctrl, stream>>>(...)` does on the NPU) --------
// Runs `body()` once per block through the runtime's launch function, with GetBlockIdx/GetBlockNum set.
template <typename Body>
inline void LaunchBlocks(int64_t block_num, const OmniRuntime* rt, Body& body) {
  struct Ctx {
    Body* body;
    int64_t num;
  } ctx{&body, block_num};
  auto trampoline = [](void* c, int64_t idx) {
    Ctx* p = static_cast<Ctx*>(c);
    detail::BlockState& s = detail::tls_block;
    s.idx = idx;
    s.num = p->num;
    (*p->body)();
  };
  if (block_num <= 1) {
    if (block_num == 1) trampoline(&ctx, 0);
    return;
  }
  rt->launch(block_num, &ctx, trampoline);
}

// How many blocks to launch for `items` independent work items of `bytes_per_item` bytes each: one block per
// core (as on the NPU, blockDim = AI core count), but a single block when the whole job is too small to pay
// for waking the thread pool (~5 us).
inline int64_t BlocksFor(int64_t items, int64_t bytes_per_item, const OmniRuntime* rt) {
  constexpr int64_t kMinBytesPerBlock = 48 * 1024;
  if (items <= 0) return 0;
  int64_t by_bytes = (items * bytes_per_item) / kMinBytesPerBlock;
  int64_t n = rt->num_cores < by_bytes ? rt->num_cores : by_bytes;
  n = n < items ? n : items;
  return n < 1 ? 1 : n;
}

// The contiguous range [begin, end) of `items` that block `idx` of `num` owns.
OMNI_INLINE void BlockRange(int64_t items, int64_t idx, int64_t num, int64_t* begin, int64_t* end) {
  int64_t base = items / num, rem = items % num;
  *begin = idx * base + (idx < rem ? idx : rem);
  *end = *begin + base + (idx < rem ? 1 : 0);
}

}  // namespace OMNI_ISA_NS
}  // namespace AscendC
