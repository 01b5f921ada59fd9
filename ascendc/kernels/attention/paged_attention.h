// Paged attention, Ascend C style: GQA decode, MLA decode and varlen (chunked) prefill in one kernel.
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
#include "kernels/attention/amx_attention.h"
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

template <typename T>
KeySource<T> MakeSource(const OmniPagedAttnArgs& a, int64_t b, int64_t kvh) {
  KeySource<T> src;
  if (a.k_cache != nullptr) {
    src.kc = static_cast<const T*>(a.k_cache) + kvh * a.k_head_stride;
    src.vc = static_cast<const T*>(a.v_cache) + kvh * a.v_head_stride;
    src.kbs = a.k_block_stride;
    src.kts = a.k_token_stride;
    src.vbs = a.v_block_stride;
    src.vts = a.v_token_stride;
    src.bs = a.block_size;
    src.table = a.block_table + b * a.table_stride;
    src.ctx = a.ctx_lens != nullptr ? a.ctx_lens[b] : 0;
  }
  if (a.cu_seqlens != nullptr) {
    const int64_t t0 = a.cu_seqlens[b];
    src.kn = static_cast<const T*>(a.k) + t0 * a.kn_token_stride + kvh * a.kn_head_stride;
    src.vn = static_cast<const T*>(a.v) + t0 * a.vn_token_stride + kvh * a.vn_head_stride;
    src.knts = a.kn_token_stride;
    src.vnts = a.vn_token_stride;
  }
  return src;
}

inline bool SharedKV(const OmniPagedAttnArgs& a) {
  // MLA: V is the first v_dim columns of the K rows.
  return a.cu_seqlens == nullptr && a.k_cache == a.v_cache && a.k_block_stride == a.v_block_stride &&
         a.k_token_stride == a.v_token_stride && a.k_head_stride == a.v_head_stride && a.v_dim <= a.head_dim;
}

template <typename T>
void LoadQ(float* dst, const T* src, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = ToFloat(src[i]) * scale;
}

// Whether items of `rows` query rows at one position go to the AMX path (amx_attention.h): bf16 on the amx
// library, no soft cap, no mask.
inline bool AmxRowsFit(const OmniPagedAttnArgs& a, int64_t rows) {
  return kHaveAmxAttention && a.dtype == OMNI_BF16 && a.soft_cap <= 0.0f &&
         (a.mask == nullptr || a.mask_kind == OMNI_MASK_NONE) && a.kv_heads <= kMaxAmxHeads &&
         AmxAttentionFits(rows, a.head_dim, a.v_dim);
}
template <typename T>
bool UseAmxRows(const OmniPagedAttnArgs& a, int64_t rows) {
  return std::is_same_v<T, bfloat16_t> && AmxRowsFit(a, rows);
}

// kv heads per AMX item: as many as leave at least two items per core (units = items per kv head).
inline int64_t HeadsPerItem(int64_t units, int64_t kv_heads, int64_t cores, int64_t max_heads = kMaxAmxHeads) {
  int64_t hpi = kv_heads;
  while (hpi > 1 && (hpi > max_heads || units * (kv_heads / hpi) < 2 * cores)) {
    --hpi;
    while (kv_heads % hpi != 0) --hpi;
  }
  return hpi;
}

// One AMX item: kv heads [kvh, kvh + hpi) of sequence b over keys [lo, hi); q0 = query row kvh * G.
template <typename T>
void AmxItem(const OmniPagedAttnArgs& a, int64_t b, int64_t kvh, int64_t hpi, int64_t lo, int64_t hi, const T* q0,
             float* o, float* m, float* l) {
  KeySource<T> srcs[kMaxAmxHeads];
  for (int64_t h = 0; h < hpi; ++h) srcs[h] = MakeSource<T>(a, b, kvh + h);
  AmxSharedKeys(srcs, hpi, a.q_heads / a.kv_heads, lo, hi, reinterpret_cast<const uint16_t*>(q0), a.q_head_stride,
                a.head_dim, a.v_dim, a.scale, o, m, l);
}

template <typename T>
void Decode(const OmniPagedAttnArgs* ap, const OmniRuntime* rt) {
  const OmniPagedAttnArgs& a = *ap;
  const int64_t G = a.q_heads / a.kv_heads, S = a.num_splits, D = a.head_dim, Dv = a.v_dim;
  const bool shared = SharedKV(a);
  const bool amx = UseAmxRows<T>(a, G);
  // The AMX path takes several kv heads per item (their cache rows are adjacent: sequential reads).
  const int64_t hpi = amx ? HeadsPerItem(a.batch * S, a.kv_heads, rt->num_cores) : 1, groups = a.kv_heads / hpi;
  const int64_t items = a.batch * groups * S;
  auto body = [&]() {
    KernelPagedAttention<T> k(a, shared, 0);
    int64_t begin, end;
    BlockRange(items, GetBlockIdx(), GetBlockNum(), &begin, &end);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t s = it % S, kvh = (it / S) % groups * hpi, b = it / (S * groups);
      // State rows of this item: workspace rows ((b * S + s) * Hq + kvh * G + g), stored as q | o | m, l blocks.
      const int64_t row0 = (b * S + s) * a.q_heads + kvh * G;
      float* q = a.workspace + row0 * D;
      const int64_t total_rows = a.batch * S * a.q_heads;
      float* o = a.workspace + total_rows * D + row0 * Dv;
      float* m = a.workspace + total_rows * (D + Dv) + row0;
      float* l = a.workspace + total_rows * (D + Dv + 1) + row0;
      const T* qsrc = static_cast<const T*>(a.q) + b * a.q_token_stride + kvh * G * a.q_head_stride;
      for (int64_t g = 0; g < hpi * G; ++g) {
        if (!amx) LoadQ(q + g * D, qsrc + g * a.q_head_stride, D, a.scale);
        std::memset(o + g * Dv, 0, Dv * 4);
        m[g] = kNegInf;
        l[g] = 0.0f;
      }
      const int64_t n = a.ctx_lens[b];
      int64_t lo = a.window > 0 ? std::max<int64_t>(0, n - a.window) : 0;
      lo = std::max(lo, s * a.split_len);
      const int64_t hi = std::min(n, (s + 1) * a.split_len);
      if (amx) {
        if (hi > lo) AmxItem(a, b, kvh, hpi, lo, hi, qsrc, o, m, l);
        continue;
      }
      k.Attend(MakeSource<T>(a, b, kvh), lo, hi, static_cast<int>(G), 1, n - 1, false, q, o, m, l,
               MakeMask(a, b, 0, kvh * G, G));
    }
  };
  LaunchBlocks(std::min<int64_t>(items, rt->num_cores), rt, body);

  // Combine the splits: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
  const int64_t total_rows = a.batch * S * a.q_heads;
  const float* o_all = a.workspace + total_rows * D;
  const float* m_all = a.workspace + total_rows * (D + Dv);
  const float* l_all = a.workspace + total_rows * (D + Dv + 1);
  const int64_t out_rows = a.batch * a.q_heads;
  auto combine = [&]() {
    int64_t begin, end;
    BlockRange(out_rows, GetBlockIdx(), GetBlockNum(), &begin, &end);
    TPipe pipe;
    TBuf<TPosition::VECCALC> acc_buf;
    pipe.InitBuffer(acc_buf, static_cast<uint32_t>(Dv * 4));
    float* acc = acc_buf.Get<float>().GetPhyAddr();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / a.q_heads, h = r % a.q_heads;
      float M = kNegInf;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t w = (b * S + s) * a.q_heads + h;
        if (l_all[w] > 0.0f) M = std::max(M, m_all[w]);
      }
      float L = 0.0f;
      std::memset(acc, 0, Dv * 4);
      if (M != kNegInf) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t w = (b * S + s) * a.q_heads + h;
          if (!(l_all[w] > 0.0f)) continue;
          const float f = VecExpF(m_all[w] - M);
          L += f * l_all[w];
          const float* os = o_all + w * Dv;
          for (int64_t d = 0; d < Dv; ++d) acc[d] += f * os[d];
        }
      }
      const float inv = L > 0.0f ? 1.0f / L : 0.0f;
      T* dst = static_cast<T*>(a.out) + b * a.out_token_stride + h * a.out_head_stride;
      for (int64_t d = 0; d < Dv; ++d) dst[d] = FromFloat<T>(acc[d] * inv);
    }
  };
  LaunchBlocks(BlocksFor(out_rows, Dv * 4 * (S + 1), rt), rt, combine);
}

// Rows of a prefill item that fit the UB next to the key tiles.
inline int64_t PrefillStateRows(int64_t D, int64_t Dv) {
  const int64_t tiles = (2 * kKC * D + kKC * Dv + kRB * kKC + kRB) * 4 + 4096;
  const int64_t rows = (static_cast<int64_t>(kUBSize) - tiles) / ((D + Dv + 2) * 4);
  return std::max<int64_t>(1, std::min<int64_t>(rows, kRB));
}

// out[t0 + j, h0 + g] = o[j * hn + g] / l[j * hn + g] for ntok tokens x hn heads.
template <typename T>
void WriteRows(const OmniPagedAttnArgs& a, int64_t t0, int64_t h0, int64_t ntok, int64_t hn, const float* o,
               const float* l) {
  const int64_t Dv = a.v_dim;
  for (int64_t j = 0; j < ntok; ++j) {
    for (int64_t g = 0; g < hn; ++g) {
      const int64_t r = j * hn + g;
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      T* dst = static_cast<T*>(a.out) + (t0 + j) * a.out_token_stride + (h0 + g) * a.out_head_stride;
      const float* os = o + r * Dv;
      for (int64_t d = 0; d < Dv; ++d) dst[d] = FromFloat<T>(os[d] * inv);
    }
  }
}

template <typename T>
void Prefill(const OmniPagedAttnArgs* ap, const OmniRuntime* rt) {
  const OmniPagedAttnArgs& a = *ap;
  const int64_t G = a.q_heads / a.kv_heads, D = a.head_dim, Dv = a.v_dim;
  const int64_t max_rows = PrefillStateRows(D, Dv);
  const int64_t hc = std::min(G, max_rows);           // heads per item
  const int64_t nhc = (G + hc - 1) / hc;
  const int64_t mq = std::max<int64_t>(1, max_rows / hc);  // query tokens per item
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (sequence, first token offset)
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t len = a.cu_seqlens[b + 1] - a.cu_seqlens[b];
    for (int64_t j = 0; j < len; j += mq) tiles.emplace_back(b, j);
  }
  const int64_t items = static_cast<int64_t>(tiles.size()) * a.kv_heads * nhc;
  const bool amx_rows = nhc == 1 && UseAmxRows<T>(a, G);
  int64_t decode_tiles = 0;
  for (int64_t b = 0; b < a.batch; ++b) decode_tiles += a.cu_seqlens[b + 1] - a.cu_seqlens[b] == 1;
  const int64_t hpi = amx_rows ? HeadsPerItem(decode_tiles, a.kv_heads, rt->num_cores, max_rows / G) : 1;
  auto body = [&]() {
    KernelPagedAttention<T> k(a, false, max_rows);
    float* st = k.State();
    int64_t begin, end;
    BlockRange(items, GetBlockIdx(), GetBlockNum(), &begin, &end);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t hci = it % nhc, kvh = (it / nhc) % a.kv_heads;
      const auto [b, j0] = tiles[it / (nhc * a.kv_heads)];
      const int64_t len = a.cu_seqlens[b + 1] - a.cu_seqlens[b];
      const int64_t t0 = a.cu_seqlens[b] + j0;
      const int64_t ntok = std::min(mq, len - j0);
      const int64_t g0 = hci * hc, hn = std::min(hc, G - g0);
      const int64_t rows = ntok * hn;
      const int64_t ctx = (a.k_cache != nullptr && a.ctx_lens != nullptr) ? a.ctx_lens[b] : 0;
      float* q = st;
      if (ntok == 1 && amx_rows) {  // one position: every row sees the same keys
        if (kvh % hpi != 0) continue;  // the item of the group's first kv head takes the whole group
        float* o1 = q + hpi * G * D;
        float* m1 = o1 + hpi * G * Dv;
        float* l1 = m1 + hpi * G;
        const T* q0 = static_cast<const T*>(a.q) + t0 * a.q_token_stride + kvh * G * a.q_head_stride;
        AmxItem(a, b, kvh, hpi, 0, a.causal ? ctx + j0 + 1 : ctx + len, q0, o1, m1, l1);
        WriteRows<T>(a, t0, kvh * G, 1, hpi * G, o1, l1);
        continue;
      }
      float* o = q + rows * D;
      float* m = o + rows * Dv;
      float* l = m + rows;
      for (int64_t j = 0; j < ntok; ++j) {
        const T* qsrc = static_cast<const T*>(a.q) + (t0 + j) * a.q_token_stride + (kvh * G + g0) * a.q_head_stride;
        for (int64_t g = 0; g < hn; ++g) LoadQ(q + (j * hn + g) * D, qsrc + g * a.q_head_stride, D, a.scale);
      }
      std::memset(o, 0, rows * Dv * 4);
      for (int64_t r = 0; r < rows; ++r) {
        m[r] = kNegInf;
        l[r] = 0.0f;
      }
      const int64_t pos0 = ctx + j0;
      const int64_t hi = a.causal ? pos0 + ntok : ctx + len;
      k.Attend(MakeSource<T>(a, b, kvh), 0, hi, static_cast<int>(rows), static_cast<int>(hn), pos0, a.causal != 0,
               q, o, m, l, MakeMask(a, b, j0, kvh * G + g0, hn));
      WriteRows<T>(a, t0, kvh * G + g0, ntok, hn, o, l);
    }
  };
  LaunchBlocks(std::min<int64_t>(items, rt->num_cores), rt, body);
}

}  // namespace attn

inline void paged_attention(const OmniPagedAttnArgs* a, const OmniRuntime* rt) {
  const bool prefill = a->cu_seqlens != nullptr;
  OMNI_DISPATCH_FLOAT(a->dtype, T, prefill ? attn::Prefill<T>(a, rt) : attn::Decode<T>(a, rt));
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
