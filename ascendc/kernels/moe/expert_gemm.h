// The expert GEMM tile shared by grouped_gemm and fused_moe: C[mb, kNT] = A[mb, K] . W[kNT, K]^T, fp32.
//
// Both operands are K-contiguous (activations [tokens, K], weights row-major [N, K] as stored in checkpoints),
// so the micro-kernel is a register-blocked dot product: kMR token rows x kNR weight rows of vector
// accumulators along K, one horizontal sum per output at the end of a K chunk. Ascend C style, each K chunk of
// both operands is first copied into the Unified Buffer and cast to fp32 (bf16 -> fp32 is a shift, fp16 ->
// fp32 vcvtph2ps), zero-padded to the vector width, so the micro-kernel has no tails and no per-dtype code.
// A weight element is converted once per tile and then reused by every token row of the tile; an item reads
// each weight row of its tile exactly once from memory.
//
// Vectors are GCC vector extensions, not intrinsics: they lower to whatever the library's ISA has (SSE2,
// AVX2, AVX-512), which keeps every library correct; plain loops left the accumulators in memory (5 GFLOP/s).
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "host/kernel_operator.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace moe {
using namespace AscendC;

#if defined(__AVX512F__)
constexpr int kV = 16, kMR = 4, kNR = 4;  // 16 zmm accumulators (2x8 and 3x8 measured 0.5-0.7x as fast)
#elif defined(__AVX2__)
constexpr int kV = 8, kMR = 3, kNR = 4;  // 12 ymm accumulators + 4 weight vectors = all 16 registers
#else
constexpr int kV = 4, kMR = 3, kNR = 4;  // SSE2: same blocking on 128-bit vectors
#endif
typedef float VecF __attribute__((vector_size(kV * sizeof(float)), may_alias));

constexpr int64_t kMB = 48;   // token rows per work item (multiple of every kMR)
constexpr int64_t kNT = 32;   // weight rows per work item (multiple of kNR, even: gate/up halves)
constexpr int64_t kKC = 512;  // K chunk staged in the UB
// UB: W chunk 64 KiB + A chunk 96 KiB + C 6 KiB of the 192 KiB.
static_assert(kNT * kKC * 4 + kMB * kKC * 4 + kMB * kNT * 4 <= kUBSize, "expert tile exceeds the UB");
static_assert(kMB % kMR == 0 && kNT % kNR == 0 && kKC % kV == 0, "tile sizes");

typedef int32_t VecI __attribute__((vector_size(kV * sizeof(int32_t))));

// Lane i of one fold of the reduction tree: x and y each hold kV / S segments of S partial sums; the result
// holds x's then y's segments, each halved (the low half plus, with `hi`, the high half).
constexpr int FoldLane(int S, int i, bool hi) {
  const int half = S / 2, nseg = kV / S, s = i / half;
  return (s / nseg) * kV + (s % nseg) * S + (hi ? half : 0) + i % half;
}
template <int S, int... I>
OMNI_INLINE VecF Fold(VecF x, VecF y, std::integer_sequence<int, I...>) {
  constexpr VecI lo = {FoldLane(S, I, false)...}, hi = {FoldLane(S, I, true)...};
  return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi);
}
// v[0..n) -> v[0..n/2): one level of the tree (segments of S lanes become S / 2); only v[0..live) are nonzero.
template <int S, int live>
OMNI_INLINE void FoldLevel(VecF* v, int n) {
  if constexpr (S > 1) {
    constexpr int next = (live + 1) / 2;
    for (int i = 0; i < next; ++i) v[i] = Fold<S>(v[2 * i], v[2 * i + 1], std::make_integer_sequence<int, kV>{});
    for (int i = next; i < n / 2; ++i) v[i] = VecF{};
    FoldLevel<S / 2, next>(v, n / 2);
  }
}

// C[r * ldc + c] += sum of acc[r][c]'s lanes + tail[r][c]: kV accumulators at a time through a transposing
// tree (log2 kV levels of two shuffles and an add), lane j of the result being the j-th accumulator's sum;
// one horizontal sum per output cost ~10x as much and, at K ~ 1k, as much as the products themselves.
template <int MR, int NR>
OMNI_INLINE void AddSums(VecF (&acc)[MR][NR], const float (&tail)[MR][NR], float* OMNI_RESTRICT C, int64_t ldc) {
  constexpr int n = MR * NR, groups = (n + kV - 1) / kV;
  float s[groups * kV];
  constexpr int last = n - (groups - 1) * kV;  // live accumulators of the last group (all kV before it)
  for (int g = 0; g < groups; ++g) {
    VecF v[kV];
    for (int j = 0; j < kV; ++j) v[j] = g * kV + j < n ? acc[(g * kV + j) / NR][(g * kV + j) % NR] : VecF{};
    if (g + 1 < groups) {
      FoldLevel<kV, kV>(v, kV);
    } else {
      FoldLevel<kV, last>(v, kV);
    }
    std::memcpy(s + g * kV, &v[0], sizeof(VecF));
  }
  // Rows of NR contiguous outputs: vector adds once inlined.
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) C[r * ldc + c] += s[r * NR + c] + tail[r][c];
}

// C[r, c] += sum_k A[r, k] * W[c, k] for r < MR, c < kNR; A, W rows of `kcp` floats (multiple of kV,
// kV-aligned), C row stride ldc.
template <int MR>
OMNI_INLINE void MicroKernel(const float* const* a, const float* OMNI_RESTRICT W, int64_t kcp,
                             float* OMNI_RESTRICT C, int64_t ldc) {
  VecF acc[MR][kNR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kNR; ++c) acc[r][c] = VecF{};
  for (int64_t k = 0; k < kcp; k += kV) {
    VecF w[kNR];
    for (int c = 0; c < kNR; ++c) w[c] = *reinterpret_cast<const VecF*>(W + c * kcp + k);
    for (int r = 0; r < MR; ++r) {
      const VecF av = *reinterpret_cast<const VecF*>(a[r] + k);
      for (int c = 0; c < kNR; ++c) acc[r][c] += av * w[c];
    }
  }
  constexpr float kNoTail[MR][kNR] = {};
  AddSums<MR, kNR>(acc, kNoTail, C, ldc);
}

// Unaligned vector loads of weights straight from global memory, converted to fp32 in registers.
typedef float VecFU __attribute__((vector_size(kV * sizeof(float)), may_alias, aligned(4)));
typedef uint16_t VecU16 __attribute__((vector_size(kV * 2), may_alias, aligned(2)));
typedef uint32_t VecU32 __attribute__((vector_size(kV * 4)));
typedef uint32_t VecU32u __attribute__((vector_size(kV * 4), may_alias, aligned(2)));
typedef _Float16 VecH __attribute__((vector_size(kV * 2), may_alias, aligned(2)));

OMNI_INLINE VecF LoadF32(const float* p) { return *reinterpret_cast<const VecFU*>(p); }
OMNI_INLINE VecF LoadF32(const bfloat16_t* p) {
  const VecU32 u = __builtin_convertvector(*reinterpret_cast<const VecU16*>(p), VecU32) << 16;
  return reinterpret_cast<const VecF&>(u);
}
OMNI_INLINE VecF LoadF32(const half* p) { return __builtin_convertvector(*reinterpret_cast<const VecH*>(p), VecF); }

// The same product with the weights read from their rows in global memory (no staging): kNR rows w[c] + k0,
// kc elements (any count: a scalar tail finishes it); token rows a[r] (fp32, staged or in place). Used when few
// tokens share the tile (decode), where staging weights would be a second pass over every byte. With `pf`,
// the same span of kNR more rows (the next group) is prefetched along the way: the first token rows of a
// group otherwise wait on memory for every weight line while the core's FMAs idle.
template <int MR, bool kPrefetch, typename TW>
OMNI_INLINE void MicroKernelDirect(const float* const* a, const TW* const* w, int64_t k0, int64_t kc,
                                   float* OMNI_RESTRICT C, int64_t ldc, const TW* const* pf) {
  VecF acc[MR][kNR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kNR; ++c) acc[r][c] = VecF{};
  const TW* wr[kNR];
  for (int c = 0; c < kNR; ++c) wr[c] = w[c] + k0;
  int64_t k = 0;
  if constexpr (std::is_same_v<TW, bfloat16_t>) {
    // bf16: a 32-bit word holds elements 2i (low half) and 2i+1 (high half); as fp32 they are word << 16
    // and word & 0xffff0000, two integer ops per 2*kV weights. A is staged with each 2*kV block split into
    // its even then its odd elements (PackRowEvenOdd) to match.
    for (; k + 2 * kV <= kc; k += 2 * kV) {
      if constexpr (kPrefetch)  // a template flag: a run-time test in the loop cost ~1/3 of its speed
        for (int c = 0; c < kNR; ++c) __builtin_prefetch(pf[c] + k0 + k, 0, 2);
      for (int c = 0; c < kNR; ++c) {
        const VecU32 word = *reinterpret_cast<const VecU32u*>(wr[c] + k);
        const VecU32 ev = word << 16, od = word & 0xffff0000u;
        const VecF e = reinterpret_cast<const VecF&>(ev), o = reinterpret_cast<const VecF&>(od);
        for (int r = 0; r < MR; ++r) {
          acc[r][c] += *reinterpret_cast<const VecF*>(a[r] + k) * e;
          acc[r][c] += *reinterpret_cast<const VecF*>(a[r] + k + kV) * o;
        }
      }
    }
  } else {
    for (; k + kV <= kc; k += kV) {
      if constexpr (kPrefetch)  // a template flag: a run-time test in the loop cost ~1/3 of its speed
        for (int c = 0; c < kNR; ++c) __builtin_prefetch(pf[c] + k0 + k, 0, 2);
      VecF av[MR];
      for (int r = 0; r < MR; ++r) av[r] = LoadF32(a[r] + k);
      for (int c = 0; c < kNR; ++c) {
        const VecF wv = LoadF32(wr[c] + k);
        for (int r = 0; r < MR; ++r) acc[r][c] += av[r] * wv;
      }
    }
  }
  float tail[MR][kNR] = {};
  for (; k < kc; ++k)
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < kNR; ++c) tail[r][c] += a[r][k] * ToFloat(wr[c][k]);
  AddSums<MR, kNR>(acc, tail, C, ldc);
}

// PackRow for the bf16 direct kernel: whole 2*kV blocks as (even elements, odd elements), the rest in order.
template <typename T>
OMNI_INLINE void PackRowEvenOdd(float* OMNI_RESTRICT dst, const T* OMNI_RESTRICT src, int64_t n, int64_t np) {
  int64_t i = 0;
  for (; i + 2 * kV <= n; i += 2 * kV)
    for (int j = 0; j < kV; ++j) {
      dst[i + j] = ToFloat(src[i + 2 * j]);
      dst[i + kV + j] = ToFloat(src[i + 2 * j + 1]);
    }
  for (; i < n; ++i) dst[i] = ToFloat(src[i]);
  for (; i < np; ++i) dst[i] = 0.0f;
}

// Copy n elements to fp32 and zero the tail up to np (the UB row).
template <typename T>
OMNI_INLINE void PackRow(float* OMNI_RESTRICT dst, const T* OMNI_RESTRICT src, int64_t n, int64_t np) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  } else if constexpr (std::is_same_v<T, bfloat16_t>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = ToFloat(src[i]);
  }
  for (int64_t i = n; i < np; ++i) dst[i] = 0.0f;
}

// Token rows up to which 16-bit weights are read directly rather than staged: staging converts a weight once
// per tile instead of once per kMR tokens, which pays off only once many tokens share the tile.
constexpr int64_t kDirectMaxRows = 12;
constexpr int64_t kDirectKC = 1024;  // K chunk of in-place fp32 activations

// One work item's UB: staged operands and the fp32 result tile.
template <typename TA, typename TW>
class ExpertTile {
 public:
  ExpertTile() {
    pipe_.InitBuffer(wbuf_, kNT * kKC * sizeof(float));
    pipe_.InitBuffer(abuf_, kMB * kKC * sizeof(float));
    pipe_.InitBuffer(cbuf_, kMB * kNT * sizeof(float));
  }

  // C[m, n] = dot(a_rows[m][0:K], w_rows[n][0:K]) for m < mb (<= kMB), n < kNT; a null weight row gives 0
  // (null rows are suffixes of kNR-aligned runs). Returns the UB result tile, row stride kNT.
  const float* Compute(const TA* const* a_rows, int64_t mb, const TW* const* w_rows, int64_t K) {
    float* C = cbuf_.Get<float>().GetPhyAddr();
    std::memset(C, 0, static_cast<size_t>(kMB * kNT) * sizeof(float));
    // fp32 weights need no conversion, so they are never staged; 16-bit ones only for many tokens.
    const bool direct = std::is_same_v<TW, float> || mb <= kDirectMaxRows;
    if (direct) {
      // 16-bit activations are staged (as fp32), whole K per pass when they fit: every weight row is then one
      // sequential stream. fp32 ones are read in place, K in even chunks of <= kDirectKC, so that a group's
      // weight rows and a micro-kernel's token rows stay in L1 together.
      constexpr bool kStageA = !std::is_same_v<TA, float>;
      const int64_t fit = (kMB * kKC) / mb / kV * kV;
      const int64_t kmax = kStageA ? (fit > kKC ? fit : kKC) : AlignUp(CeilDiv(K, CeilDiv(K, kDirectKC)), kV);
      const TW* w_fixed[kNT];
      for (int64_t n = 0; n < kNT; ++n) {
        const int64_t g = n / kNR * kNR;
        w_fixed[n] = w_rows[n] != nullptr ? w_rows[n] : w_rows[g];  // padding rows repeat a real row
      }
      for (int64_t k0 = 0; k0 < K; k0 += kmax) {
        const int64_t kc = K - k0 < kmax ? K - k0 : kmax;
        const int64_t kcp = AlignUp(kc, kV);
        float* Ap = abuf_.Get<float>().GetPhyAddr();
        const float* ap[kMB];
        for (int64_t m = 0; m < mb; ++m) {
          if constexpr (!kStageA) {
            ap[m] = a_rows[m] + k0;
          } else {
            ap[m] = Ap + m * kcp;
            if constexpr (std::is_same_v<TW, bfloat16_t>) {
              PackRowEvenOdd(Ap + m * kcp, a_rows[m] + k0, kc, kcp);
            } else {
              PackRow(Ap + m * kcp, a_rows[m] + k0, kc, kcp);
            }
          }
        }
        for (int64_t n0 = 0; n0 < kNT; n0 += kNR) {
          if (w_rows[n0] == nullptr) continue;
          const bool next = n0 + kNR < kNT && w_rows[n0 + kNR] != nullptr;
          RowGroups<true>(ap, w_fixed + n0, nullptr, 0, k0, kc, mb, C + n0, next ? w_fixed + n0 + kNR : nullptr);
        }
      }
      return C;
    }
    float* Wp = wbuf_.Get<float>().GetPhyAddr();
    float* Ap = abuf_.Get<float>().GetPhyAddr();
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = K - k0 < kKC ? K - k0 : kKC;
      const int64_t kcp = AlignUp(kc, kV);
      for (int64_t n = 0; n < kNT; ++n) {
        if (w_rows[n] != nullptr) {
          PackRow(Wp + n * kcp, w_rows[n] + k0, kc, kcp);
        } else {
          std::memset(Wp + n * kcp, 0, static_cast<size_t>(kcp) * sizeof(float));
        }
      }
      const float* ap[kMB];
      for (int64_t m = 0; m < mb; ++m) {
        PackRow(Ap + m * kcp, a_rows[m] + k0, kc, kcp);
        ap[m] = Ap + m * kcp;
      }
      for (int64_t n0 = 0; n0 < kNT; n0 += kNR) {
        if (w_rows[n0] == nullptr) continue;
        RowGroups<false>(ap, nullptr, Wp + n0 * kcp, kcp, 0, kcp, mb, C + n0, nullptr);
      }
    }
    return C;
  }

 private:
  // All token rows a[0..mb) against one group of kNR weight rows (in place: w; staged: Wp, row stride kcp),
  // kMR rows at a time, then the remainder; the first rows prefetch the group `pf` (direct only).
  template <bool kDirect>
  OMNI_INLINE void RowGroups(const float* const* a, const TW* const* w, const float* Wp, int64_t kcp, int64_t k0,
                             int64_t kc, int64_t mb, float* C, const TW* const* pf) {
    int64_t m0 = 0;
    for (; m0 + kMR <= mb; m0 += kMR, pf = nullptr) Micro<kMR, kDirect>(a + m0, w, Wp, kcp, k0, kc, C + m0 * kNT, pf);
    static_assert(kMR <= 4, "remainder rows");
    const int64_t rest = mb - m0;
    if (rest == 1) Micro<1, kDirect>(a + m0, w, Wp, kcp, k0, kc, C + m0 * kNT, pf);
    if constexpr (kMR > 2) {
      if (rest == 2) Micro<2, kDirect>(a + m0, w, Wp, kcp, k0, kc, C + m0 * kNT, pf);
    }
    if constexpr (kMR > 3) {
      if (rest == 3) Micro<3, kDirect>(a + m0, w, Wp, kcp, k0, kc, C + m0 * kNT, pf);
    }
  }
  template <int MR, bool kDirect>
  OMNI_INLINE void Micro(const float* const* a, const TW* const* w, const float* Wp, int64_t kcp, int64_t k0,
                         int64_t kc, float* C, const TW* const* pf) {
    if constexpr (kDirect) {
      if (pf != nullptr) {
        MicroKernelDirect<MR, true>(a, w, k0, kc, C, kNT, pf);
      } else {
        MicroKernelDirect<MR, false>(a, w, k0, kc, C, kNT, pf);
      }
    } else {
      MicroKernel<MR>(a, Wp, kcp, C, kNT);
    }
  }

  TPipe pipe_;
  TBuf<TPosition::VECCALC> wbuf_, abuf_, cbuf_;
};

// Dynamic work distribution: blocks pull items from a shared counter, so a block slowed by another process
// on its core does not hold up the launch (the machines we serve on share cores).
template <typename ItemFn>
inline void RunItems(int64_t items, int64_t bytes_per_item, const OmniRuntime* rt, ItemFn& item_fn) {
  if (items <= 0) return;
  std::atomic<int64_t> next{0};
  auto body = [&]() {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < items;
         i = next.fetch_add(1, std::memory_order_relaxed))
      item_fn(i);
  };
  LaunchBlocks(BlocksFor(items, bytes_per_item, rt), rt, body);
}

// Per-expert item prefix sums: expert e (rows [offsets[e], offsets[e + 1])) has ceil(rows / rows_per_item) row
// blocks times `tiles` column tiles of items; prefix [E + 1]. Experts with no rows have no items.
OMNI_INLINE void ItemPrefix(const int64_t* offsets, int64_t E, int64_t rows_per_item, int64_t tiles, int64_t* prefix) {
  prefix[0] = 0;
  for (int64_t e = 0; e < E; ++e) prefix[e + 1] = prefix[e] + CeilDiv(offsets[e + 1] - offsets[e], rows_per_item) * tiles;
}

// Item -> (expert, tile, block) from per-expert item prefix sums; experts with no rows have no items.
struct ItemMap {
  const int64_t* item_prefix;  // [E + 1]
  int64_t num_experts;
  OMNI_INLINE int64_t Expert(int64_t item) const {
    int64_t lo = 0, hi = num_experts;  // find e with prefix[e] <= item < prefix[e + 1]
    while (hi - lo > 1) {
      int64_t mid = (lo + hi) / 2;
      if (item_prefix[mid] <= item) lo = mid; else hi = mid;
    }
    return lo;
  }
};

// A work item of the row-major expert GEMMs (ItemPrefix with kMB rows per item; an expert's items are its row
// blocks within each column tile): expert e, column tile `tile`, rows [r0, r0 + mb) of the sorted rows.
struct RowItem {
  int64_t e, tile, r0, mb;
};
OMNI_INLINE RowItem SplitRowItem(const ItemMap& map, const int64_t* offsets, int64_t it) {
  const int64_t e = map.Expert(it);
  const int64_t local = it - map.item_prefix[e];
  const int64_t blocks = CeilDiv(offsets[e + 1] - offsets[e], kMB);
  const int64_t r0 = offsets[e] + (local % blocks) * kMB;
  const int64_t left = offsets[e + 1] - r0;
  return {e, local / blocks, r0, left < kMB ? left : kMB};
}

// Weight row n of the row-major [N, K] matrix w; null past N (a zero column of the tile).
template <typename T>
OMNI_INLINE const T* MatrixRow(const T* w, int64_t n, int64_t N, int64_t K) {
  return n < N ? w + n * K : nullptr;
}

// The item's C tile [it.mb, kNT] (row stride kNT, in `tile`'s UB): A rows a_row(r) for the item's rows r against
// the weight rows w_row(n), n < kNT.
template <typename T, typename ARowFn, typename WRowFn>
OMNI_INLINE const float* ItemProduct(ExpertTile<T, T>& tile, const RowItem& it, ARowFn a_row, WRowFn w_row, int64_t K) {
  const T* a_rows[kMB];
  const T* w_rows[kNT];
  for (int64_t m = 0; m < it.mb; ++m) a_rows[m] = a_row(it.r0 + m);
  for (int64_t n = 0; n < kNT; ++n) w_rows[n] = w_row(n);
  return tile.Compute(a_rows, it.mb, w_rows, K);
}

}  // namespace moe
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
