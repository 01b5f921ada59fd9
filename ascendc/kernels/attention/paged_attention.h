// Paged attention, Ascend C style: GQA decode, MLA decode and varlen (chunked) prefill in one kernel (its
// launches and the AMX route for decode-shaped items: paged_launch.h).
//
// Work items
//   decode:  (sequence, kv head, key split) -- flash-decoding. The G = Hq/Hkv query heads of a kv head (MLA: all
//            H heads, one shared latent "kv head") are the rows of one item, so each cache row is loaded once and
//            used by every head. Each item leaves an un-normalised partial (acc, max, sum) per head in the fp32
//            workspace; a combine pass merges the splits. Splits make long contexts use every core at batch 1.
//   prefill: (sequence, kv head, head chunk, tile of query tokens); rows = tokens x heads; state in the UB.
// Per item the keys are walked in chunks of kKC = 16 positions. A chunk's K rows are converted to fp32 once
// (bf16/fp16 -> fp32 in the UB) into Kr [16, D] and transposed into KT [D, 16]; then for every block of rows
//   S[rows, 16] = Q[rows, D] . KT          (register-blocked: kMR rows x 16 keys, broadcast Q, vector KT)
//   online softmax in fp32 (running max / sum per row)
//   O[rows, Dv] = O * alpha + P . V        (V = Kr's first Dv columns for MLA, else its own tile Vr [16, Dv])
// Keys a sequence does not own are never read: positions outside [lo, hi) of a chunk are zero-filled in the
// tiles and masked to -inf, so NaN garbage in foreign blocks cannot leak into the result.
#pragma once
#pragma GCC diagnostic ignored "-Wpsabi"
#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "host/kernel_operator.h"
#include "omni/ops/attention.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
using namespace AscendC;

namespace attn {

// GCC vector extensions: portable across the ISA libraries (no intrinsics), and keep the register tile in
// registers where plain arrays sometimes spill.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kMR = 8;  // rows per register tile: 8 x 1 zmm accumulators
#else
constexpr int kVecBytes = 32;
constexpr int kMR = 6;  // 6 rows x 2 ymm = 12 accumulators of the 16 ymm registers
#endif
typedef float vfloat __attribute__((vector_size(kVecBytes)));
constexpr int kVL = kVecBytes / 4;
constexpr int kKC = 16;         // keys per chunk
constexpr int kNV = kKC / kVL;  // vectors per chunk row
constexpr int kRB = 64;         // rows per score tile
constexpr float kNegInf = -__builtin_inff();

OMNI_INLINE vfloat VLoad(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
OMNI_INLINE void VStore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
// Broadcast. `x - 0` is exact for every x (so it folds to a plain vbroadcastss); `x + 0` is not (-0 + 0 = +0) and
// costs an add, and an element-by-element fill compiles to a chain of inserts.
OMNI_INLINE vfloat Splat(float x) { return x - vfloat{}; }

// 8 x 8 transpose with generic shuffles (3 stages: 32-bit pairs, 64-bit pairs, 128-bit halves). 8-wide on every
// ISA library (AVX-512 machines run it on ymm; the generic build splits it into SSE halves).
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
OMNI_INLINE v8f L8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
OMNI_INLINE void Transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  const v8i lo32 = {0, 8, 1, 9, 4, 12, 5, 13}, hi32 = {2, 10, 3, 11, 6, 14, 7, 15};
  const v8i lo64 = {0, 1, 8, 9, 4, 5, 12, 13}, hi64 = {2, 3, 10, 11, 6, 7, 14, 15};
  const v8i lo128 = {0, 1, 2, 3, 8, 9, 10, 11}, hi128 = {4, 5, 6, 7, 12, 13, 14, 15};
  v8f r[8], a[8], b[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = L8(src + i * lds);
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) {
    a[i] = __builtin_shuffle(r[i], r[i + 1], lo32);
    a[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi32);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 8; i += 4) {
    b[i] = __builtin_shuffle(a[i], a[i + 2], lo64);
    b[i + 1] = __builtin_shuffle(a[i], a[i + 2], hi64);
    b[i + 2] = __builtin_shuffle(a[i + 1], a[i + 3], lo64);
    b[i + 3] = __builtin_shuffle(a[i + 1], a[i + 3], hi64);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const v8f c0 = __builtin_shuffle(b[j], b[j + 4], lo128), c1 = __builtin_shuffle(b[j], b[j + 4], hi128);
    std::memcpy(dst + j * ldd, &c0, sizeof(c0));
    std::memcpy(dst + (j + 4) * ldd, &c1, sizeof(c1));
  }
}

// The register tile of ScoreTile / PVTile: MR rows of one chunk row (kNV vectors).
template <int MR>
using RegTile = vfloat[MR][kNV];

// b = the kNV vectors of the chunk row at p.
OMNI_INLINE void LoadChunkRow(vfloat (&b)[kNV], const float* p) {
#pragma GCC unroll 4
  for (int v = 0; v < kNV; ++v) b[v] = VLoad(p + v * kVL);
}

// acc[r, :] += x[r * ldx] * b for r < MR: one rank-1 update of the tile.
template <int MR>
OMNI_INLINE void RankOneUpdate(RegTile<MR>& acc, const vfloat (&b)[kNV], const float* x, int64_t ldx) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const vfloat xr = Splat(x[r * ldx]);
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[r][v] += xr * b[v];
  }
}

// dst[r * ldd + 0:16] = acc[r, :] for r < MR.
template <int MR>
OMNI_INLINE void StoreTile(float* dst, int64_t ldd, const RegTile<MR>& acc) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) VStore(dst + r * ldd + v * kVL, acc[r][v]);
}

// s[r, 0:16] = sum_d a[r, d] * kt[d, 0:16] for r < MR.
template <int MR>
OMNI_INLINE void ScoreTile(const float* OMNI_RESTRICT a, int64_t lda, const float* OMNI_RESTRICT kt, int64_t D,
                           float* OMNI_RESTRICT s) {
  RegTile<MR> acc;
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[r][v] = vfloat{};
  for (int64_t d = 0; d < D; ++d) {
    vfloat b[kNV];
    LoadChunkRow(b, kt + d * kKC);
    RankOneUpdate<MR>(acc, b, a + d, lda);
  }
  StoreTile<MR>(s, kKC, acc);
}

// o[r, :] = o[r, :] * alpha[r] + sum_t p[r, t] * vt[t, :] for r < MR, t < 16.
template <int MR>
OMNI_INLINE void PVTile(float* OMNI_RESTRICT o, int64_t ldo, const float* OMNI_RESTRICT alpha,
                        const float* OMNI_RESTRICT p, const float* OMNI_RESTRICT vt, int64_t ldv, int64_t Dv) {
  int64_t d0 = 0;
  for (; d0 + kKC <= Dv; d0 += kKC) {
    RegTile<MR> acc;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const vfloat al = Splat(alpha[r]);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[r][v] = VLoad(o + r * ldo + d0 + v * kVL) * al;
    }
#pragma GCC unroll 4
    for (int t = 0; t < kKC; ++t) {
      vfloat b[kNV];
      LoadChunkRow(b, vt + t * ldv + d0);
      RankOneUpdate<MR>(acc, b, p + t, kKC);
    }
    StoreTile<MR>(o + d0, ldo, acc);
  }
  for (; d0 < Dv; ++d0) {
    for (int r = 0; r < MR; ++r) {
      float acc = o[r * ldo + d0] * alpha[r];
      for (int t = 0; t < kKC; ++t) acc += p[r * kKC + t] * vt[t * ldv + d0];
      o[r * ldo + d0] = acc;
    }
  }
}

template <int MR>
OMNI_INLINE void ScoreRowsFixed(const float* a, int64_t lda, const float* kt, int64_t D, float* s, int rows) {
  int r = 0;
  for (; r + MR <= rows; r += MR) ScoreTile<MR>(a + r * lda, lda, kt, D, s + r * kKC);
  switch (rows - r) {
    case 0: break;
#define OMNI_CASE(n) \
  case n: if constexpr (n < MR) ScoreTile<n>(a + r * lda, lda, kt, D, s + r * kKC); break;
    OMNI_CASE(1) OMNI_CASE(2) OMNI_CASE(3) OMNI_CASE(4) OMNI_CASE(5) OMNI_CASE(6) OMNI_CASE(7)
#undef OMNI_CASE
    default: break;
  }
}

template <int MR>
OMNI_INLINE void PVRowsFixed(float* o, int64_t ldo, const float* alpha, const float* p, const float* vt, int64_t ldv,
                             int64_t Dv, int rows) {
  int r = 0;
  for (; r + MR <= rows; r += MR) PVTile<MR>(o + r * ldo, ldo, alpha + r, p + r * kKC, vt, ldv, Dv);
  switch (rows - r) {
    case 0: break;
#define OMNI_CASE(n) \
  case n: if constexpr (n < MR) PVTile<n>(o + r * ldo, ldo, alpha + r, p + r * kKC, vt, ldv, Dv); break;
    OMNI_CASE(1) OMNI_CASE(2) OMNI_CASE(3) OMNI_CASE(4) OMNI_CASE(5) OMNI_CASE(6) OMNI_CASE(7)
#undef OMNI_CASE
    default: break;
  }
}

// Where the keys of one (sequence, kv head) live: positions [0, ctx) in the paged cache, then new tokens.
template <typename T>
struct KeySource {
  const T* kc = nullptr;  // cache base + head offset
  const T* vc = nullptr;
  int64_t kbs = 0, kts = 0, vbs = 0, vts = 0, bs = 1;
  const int32_t* table = nullptr;
  int64_t ctx = 0;
  const T* kn = nullptr;  // new tokens of this sequence (+ head offset)
  const T* vn = nullptr;
  int64_t knts = 0, vnts = 0;

  OMNI_INLINE const T* K(int64_t pos) const {
    if (pos < ctx) return kc + static_cast<int64_t>(table[pos / bs]) * kbs + (pos % bs) * kts;
    return kn + (pos - ctx) * knts;
  }
  OMNI_INLINE const T* V(int64_t pos) const {
    if (pos < ctx) return vc + static_cast<int64_t>(table[pos / bs]) * vbs + (pos % bs) * vts;
    return vn + (pos - ctx) * vnts;
  }
};

// The mask rows of one work item: row r of the item is query row tok0 + r / heads_per_tok of its sequence and
// q head head0 + r % heads_per_tok; its mask row starts at base + that * strides (column = key position).
struct MaskRows {
  const char* base = nullptr;  // already offset to the item's sequence; nullptr = no mask
  int32_t kind = OMNI_MASK_NONE;
  int64_t head_stride = 0, q_stride = 0, tok0 = 0, head0 = 0;
  int64_t heads_per_tok = 1;

  // Apply to the scores s[i] of keys c0 + i, i in [i0, i1) (the only columns the row may read).
  OMNI_INLINE void Apply(int64_t r, int64_t c0, int i0, int i1, float* s) const {
    const int64_t off = (tok0 + r / heads_per_tok) * q_stride + (head0 + r % heads_per_tok) * head_stride + c0;
    if (kind == OMNI_MASK_BOOL) {
      const uint8_t* m = reinterpret_cast<const uint8_t*>(base) + off;
      for (int i = i0; i < i1; ++i) s[i] = m[i] ? s[i] : kNegInf;
    } else {
      const float* m = reinterpret_cast<const float*>(base) + off;
      for (int i = i0; i < i1; ++i) s[i] += m[i];
    }
  }
};

inline MaskRows MakeMask(const OmniPagedAttnArgs& a, int64_t b, int64_t tok0, int64_t head0, int64_t heads_per_tok) {
  MaskRows mk;
  if (a.mask == nullptr || a.mask_kind == OMNI_MASK_NONE) return mk;
  const int64_t esize = a.mask_kind == OMNI_MASK_BOOL ? 1 : 4;
  mk.base = static_cast<const char*>(a.mask) + b * a.mask_batch_stride * esize;
  mk.kind = a.mask_kind;
  mk.head_stride = a.mask_head_stride;
  mk.q_stride = a.mask_q_stride;
  mk.tok0 = tok0;
  mk.head0 = head0;
  mk.heads_per_tok = heads_per_tok;
  return mk;
}

template <typename T>
OMNI_INLINE void RowToFloat(float* OMNI_RESTRICT dst, const T* OMNI_RESTRICT src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = ToFloat(src[i]);
}

template <typename T>
class KernelPagedAttention {
 public:
  explicit KernelPagedAttention(const OmniPagedAttnArgs& a, bool shared_kv, int64_t state_rows)
      : a_(a), shared_kv_(shared_kv), D_(a.head_dim), Dv_(a.v_dim) {
    pipe_.InitBuffer(kr_, kKC * D_ * 4);
    pipe_.InitBuffer(kt_, kKC * D_ * 4);
    if (!shared_kv_) pipe_.InitBuffer(vr_, kKC * Dv_ * 4);
    pipe_.InitBuffer(s_, kRB * kKC * 4);
    pipe_.InitBuffer(alpha_, kRB * 4);
    if (state_rows > 0) pipe_.InitBuffer(state_, static_cast<uint32_t>(state_rows * (D_ + Dv_ + 2) * 4));
  }

  // Rows share keys [lo, hi); row r sits at position pos0 + r / rows_per_pos (causal only). State: q [rows, D]
  // (pre-scaled fp32), o [rows, Dv], m [rows], l [rows].
  void Attend(const KeySource<T>& src, int64_t lo, int64_t hi, int rows, int rows_per_pos, int64_t pos0,
              bool causal, float* q, float* o, float* m, float* l, const MaskRows& mask = MaskRows()) {
    if (lo >= hi || rows == 0) return;
    float* kr = kr_.Get<float>().GetPhyAddr();
    float* kt = kt_.Get<float>().GetPhyAddr();
    float* vr = shared_kv_ ? kr : vr_.Get<float>().GetPhyAddr();
    const int64_t ldv = shared_kv_ ? D_ : Dv_;
    float* s = s_.Get<float>().GetPhyAddr();
    float* alpha = alpha_.Get<float>().GetPhyAddr();
    const float cap = a_.soft_cap;
    for (int64_t c0 = lo / kKC * kKC; c0 < hi; c0 += kKC) {
      const int i0 = static_cast<int>(std::max<int64_t>(lo - c0, 0));
      const int i1 = static_cast<int>(std::min<int64_t>(hi - c0, kKC));
      // K/V rows of this chunk (fp32) and their row strides: the cache itself when the chunk is 16 whole fp32
      // rows inside one block (no copy), else the converted, zero-padded UB tiles.
      const float* kp = kr;
      const float* vp = vr;
      int64_t ldk = D_, ldvc = ldv;
      if (!DirectRows(src, c0, i0, i1, &kp, &ldk, &vp, &ldvc)) LoadChunk(src, c0, i0, i1, kr, vr);
      TransposeChunk(kp, ldk, kt);
      for (int r0 = 0; r0 < rows; r0 += kRB) {
        const int rb = std::min(kRB, rows - r0);
        // Causal: a chunk entirely after this row block's last position contributes nothing.
        if (causal && c0 + i0 > pos0 + (r0 + rb - 1) / rows_per_pos) continue;
        ScoreRowsFixed<kMR>(q + r0 * D_, D_, kt, D_, s, rb);
        for (int r = 0; r < rb; ++r) {
          float* sr = s + r * kKC;
          int hi_i = i1;
          if (causal) hi_i = static_cast<int>(std::min<int64_t>(i1, pos0 + (r0 + r) / rows_per_pos - c0 + 1));
          if (cap > 0.0f) {
            const float inv = 1.0f / cap;
            for (int i = 0; i < kKC; ++i) sr[i] = cap * (1.0f - 2.0f / (VecExpF(2.0f * sr[i] * inv) + 1.0f));
          }
          if (mask.base != nullptr) mask.Apply(r0 + r, c0, i0, hi_i, sr);
          float mx = kNegInf;
          for (int i = 0; i < kKC; ++i) {
            const bool ok = i >= i0 && i < hi_i;
            sr[i] = ok ? sr[i] : kNegInf;
            mx = sr[i] > mx ? sr[i] : mx;
          }
          const float m_old = m[r0 + r];
          const float m_new = m_old > mx ? m_old : mx;
          if (m_new == kNegInf) {  // no key for this row yet
            for (int i = 0; i < kKC; ++i) sr[i] = 0.0f;
            alpha[r] = 1.0f;
            continue;
          }
          float sum = 0.0f;
          for (int i = 0; i < kKC; ++i) {
            const float p = sr[i] == kNegInf ? 0.0f : VecExpF(sr[i] - m_new);
            sr[i] = p;
            sum += p;
          }
          const float al = m_old == kNegInf ? 0.0f : VecExpF(m_old - m_new);
          alpha[r] = al;
          l[r0 + r] = l[r0 + r] * al + sum;
          m[r0 + r] = m_new;
        }
        PVRowsFixed<kMR>(o + r0 * Dv_, Dv_, alpha, s, vp, ldvc, Dv_, rb);
      }
    }
  }

  float* State() { return state_.Get<float>().GetPhyAddr(); }

 private:
  bool DirectRows(const KeySource<T>& src, int64_t c0, int i0, int i1, const float** kp, int64_t* ldk,
                  const float** vp, int64_t* ldv) const {
    if constexpr (!std::is_same_v<T, float>) {
      return false;
    } else {
      if (i0 != 0 || i1 != kKC || c0 + kKC > src.ctx || (c0 % src.bs) + kKC > src.bs) return false;
      *kp = src.K(c0);
      *ldk = src.kts;
      *vp = shared_kv_ ? *kp : src.V(c0);
      *ldv = shared_kv_ ? src.kts : src.vts;
      return true;
    }
  }

  // Kr[i] = K(c0 + i) in fp32, Vr[i] = V(c0 + i), for i in [i0, i1); zeros elsewhere.
  void LoadChunk(const KeySource<T>& src, int64_t c0, int i0, int i1, float* kr, float* vr) {
    for (int i = 0; i < kKC; ++i) {
      float* row = kr + i * D_;
      if (i < i0 || i >= i1) {
        std::memset(row, 0, D_ * 4);
        if (!shared_kv_) std::memset(vr + i * Dv_, 0, Dv_ * 4);
        continue;
      }
      const int64_t pos = c0 + i;
      RowToFloat(row, src.K(pos), D_);
      if (!shared_kv_) RowToFloat(vr + i * Dv_, src.V(pos), Dv_);
    }
  }

  // KT = K^T in 8 x 8 register blocks; a tail of D % 8 columns element by element.
  void TransposeChunk(const float* k, int64_t ldk, float* kt) const {
    int64_t d0 = 0;
    for (; d0 + 8 <= D_; d0 += 8)
      for (int i0 = 0; i0 < kKC; i0 += 8) Transpose8(k + i0 * ldk + d0, ldk, kt + d0 * kKC + i0, kKC);
    for (; d0 < D_; ++d0)
      for (int i = 0; i < kKC; ++i) kt[d0 * kKC + i] = k[i * ldk + d0];
  }

  const OmniPagedAttnArgs& a_;
  bool shared_kv_;
  int64_t D_, Dv_;
  TPipe pipe_;
  TBuf<TPosition::VECCALC> kr_, kt_, vr_, s_, alpha_, state_;
};

}  // namespace attn
}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
