// Bindings of the attention family (ascendc/kernels/attention/): every shape, stride and index value is checked
// here before a kernel runs, because omniops._C is reachable directly. Index checks read block_table/seq_lens
// (one pass over the covered entries) and slot_mapping.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

#include "bindings/common.h"
#include "omni/ops/attention.h"

namespace omni {
constexpr const char* FAMILY = "attention";
namespace {

std::string S(int64_t v) { return std::to_string(v); }

void CheckIndex(const at::Tensor& t, const char* name, at::ScalarType st, int64_t dim) {
  CheckCpu(t, name);
  if (t.scalar_type() != st)
    TypeError(std::string(name) + ": expected " + c10::toString(st) + ", got " + c10::toString(t.scalar_type()));
  if (t.dim() != dim) ValueError(std::string(name) + ": expected a " + S(dim) + "-D tensor, got shape " + Shape(t));
  if (t.numel() > 0 && t.stride(dim - 1) != 1 && t.size(dim - 1) > 1)
    ValueError(std::string(name) + ": last dimension must be contiguous");
  for (int64_t d = 0; d < dim; ++d)
    if (t.stride(d) < 0) ValueError(std::string(name) + ": negative strides are not supported");
}

// A tensor read with unit inner stride and non-negative strides (any index below its sizes is in bounds).
void CheckReadable(const at::Tensor& t, const char* name, int64_t dim) {
  CheckCpu(t, name);
  if (t.dim() != dim) ValueError(std::string(name) + ": expected a " + S(dim) + "-D tensor, got shape " + Shape(t));
  if (t.numel() > 0 && t.size(dim - 1) > 1 && t.stride(dim - 1) != 1)
    ValueError(std::string(name) + ": last dimension must be contiguous (stride 1)");
  for (int64_t d = 0; d < dim; ++d)
    if (t.stride(d) < 0) ValueError(std::string(name) + ": negative strides are not supported");
}

void CheckDims(const at::Tensor& t, const char* name, std::initializer_list<int64_t> expected, const char* what) {
  std::vector<int64_t> e(expected);
  bool ok = t.dim() == static_cast<int64_t>(e.size());
  for (size_t i = 0; ok && i < e.size(); ++i) ok = e[i] < 0 || t.size(i) == e[i];
  if (!ok) {
    std::string s = "[";
    for (size_t i = 0; i < e.size(); ++i) s += (i ? ", " : "") + (e[i] < 0 ? std::string("*") : S(e[i]));
    ValueError(std::string(name) + ": expected shape " + s + "] (" + what + "), got " + Shape(t));
  }
}

// A paged cache [num_blocks, block_size, heads, dim] that is written: slots must not share memory.
void CheckCacheWritable(const at::Tensor& c, const char* name) {
  if (c.numel() == 0) return;
  const int64_t nb = c.size(0), bs = c.size(1), h = c.size(2), d = c.size(3);
  const bool heads_ok = h <= 1 || c.stride(2) >= d;
  const bool toks_ok = bs <= 1 || c.stride(1) >= (h - 1) * c.stride(2) + d;
  const bool blks_ok = nb <= 1 || c.stride(0) >= (bs - 1) * c.stride(1) + (h - 1) * c.stride(2) + d;
  if (!heads_ok || !toks_ok || !blks_ok) ValueError(std::string(name) + ": blocks, slots or heads overlap in memory");
}

// block_table [B, max_blocks] int32 and lengths [B] int32: lengths in [0, max_blocks * block_size] and the table
// entries the lengths cover in [0, num_blocks). Returns the largest length.
int64_t CheckTable(const at::Tensor& table, const at::Tensor& lens, const char* lens_name, int64_t batch,
                   int64_t num_blocks, int64_t block_size) {
  CheckIndex(table, "block_table", at::kInt, 2);
  CheckIndex(lens, lens_name, at::kInt, 1);
  if (table.size(0) != batch) ValueError("block_table: expected " + S(batch) + " rows (one per sequence), got shape " + Shape(table));
  if (lens.size(0) != batch) ValueError(std::string(lens_name) + ": expected shape [" + S(batch) + "], got " + Shape(lens));
  const int64_t max_blocks = table.size(1);
  const int32_t* l = lens.data_ptr<int32_t>();
  const int32_t* t = table.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = l[b * lens.stride(0)];
    if (n < 0 || n > max_blocks * block_size)
      ValueError(std::string(lens_name) + "[" + S(b) + "] = " + S(n) + " is outside [0, " + S(max_blocks * block_size) +
                 "] (block_table covers " + S(max_blocks) + " blocks of " + S(block_size) + " tokens)");
    max_len = std::max(max_len, n);
    const int64_t nblk = (n + block_size - 1) / block_size;
    for (int64_t j = 0; j < nblk; ++j) {
      const int64_t id = t[b * table.stride(0) + j];
      if (id < 0 || id >= num_blocks)
        ValueError("block_table[" + S(b) + ", " + S(j) + "] = " + S(id) + " is outside [0, " + S(num_blocks) +
                   ") (num_blocks of the cache)");
    }
  }
  return max_len;
}

void CheckSlots(const at::Tensor& slots, int64_t tokens, int64_t num_slots) {
  CheckIndex(slots, "slot_mapping", at::kLong, 1);
  if (slots.size(0) != tokens) ValueError("slot_mapping: expected shape [" + S(tokens) + "], got " + Shape(slots));
  const int64_t* p = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i)
    if (p[i] < -1 || p[i] >= num_slots)
      ValueError("slot_mapping[" + S(i) + "] = " + S(p[i]) + " is outside [-1, " + S(num_slots) +
                 ") (-1 = skip; num_blocks * block_size slots)");
}

void CheckScale(double scale, double soft_cap) {
  if (!std::isfinite(scale)) ValueError("scale: expected a finite number, got " + std::to_string(scale));
  if (!(soft_cap >= 0.0) || !std::isfinite(soft_cap)) ValueError("soft_cap: expected a finite value >= 0 (0 = none)");
}

void CheckOut(const at::Tensor& out, const at::Tensor& q, int64_t rows, int64_t heads, int64_t dv) {
  CheckCpu(out, "out");
  CheckSameDtype(out, q, "out", "q");
  CheckDims(out, "out", {rows, heads, dv}, "rows, q_heads, v_dim");
  if (!out.is_contiguous()) ValueError("out: must be contiguous");
  CheckAlias(out, q, "out", "q");
}

int64_t NumSplits(int64_t items, int64_t max_len) {
  // Enough (sequence, kv head, split) items for every core, but splits of at least 256 keys.
  const int64_t cores = std::max<int64_t>(1, at::get_num_threads());
  if (items <= 0 || max_len <= 0) return 1;
  int64_t s = (2 * cores + items - 1) / items;
  s = std::min(s, (max_len + 255) / 256);
  return std::max<int64_t>(1, s);
}

void LaunchDecode(OmniPagedAttnArgs& a, int64_t max_len) {
  a.num_splits = NumSplits(a.batch * a.kv_heads, max_len);
  a.split_len = std::max<int64_t>(16, ((max_len + a.num_splits - 1) / a.num_splits + 15) / 16 * 16);
  at::Tensor ws = at::empty({omni_attention_workspace_floats(a.batch, a.num_splits, a.q_heads, a.head_dim, a.v_dim)},
                            at::TensorOptions().dtype(at::kFloat));
  a.workspace = ws.data_ptr<float>();
  OmniRuntime rt = Runtime();
  Kernels<OmniAttentionKernels>("omni_attention_kernels")->paged_attention(&a, &rt);
}

// q (float, q_dim dims) and k / v (or the k / v caches; kv_dim dims): readable, k and v of q's dtype.
// Returns q's OmniDType.
int32_t CheckQKV(const at::Tensor& q, int64_t q_dim, const at::Tensor& k, const char* k_name, const at::Tensor& v,
                 const char* v_name, int64_t kv_dim) {
  CheckReadable(q, "q", q_dim);
  const int32_t dt = FloatDType(q, "q");
  CheckReadable(k, k_name, kv_dim);
  CheckReadable(v, v_name, kv_dim);
  CheckSameDtype(k, q, k_name, "q");
  CheckSameDtype(v, q, v_name, "q");
  return dt;
}

// Argument setup shared by the entry points (after their checks).
// q / out rows: the (token, head) strides of dims tok and head.
void SetRows(OmniPagedAttnArgs& a, const at::Tensor& q, const at::Tensor& out, int tok, int head) {
  a.q = q.data_ptr();
  a.q_token_stride = q.stride(tok);
  a.q_head_stride = q.stride(head);
  a.out = out.data_ptr();
  a.out_token_stride = out.stride(tok);
  a.out_head_stride = out.stride(head);
}

// Paged k / v caches: the (block, token, head) strides of dims blk, tok, head (head < 0: one shared head).
// Args: OmniPagedAttnArgs (read) or OmniReshapeAndCacheArgs (written), which name these fields alike.
template <typename Args>
void SetCache(Args& a, const at::Tensor& kc, const at::Tensor& vc, int blk, int tok, int head) {
  a.k_cache = kc.data_ptr();
  a.v_cache = vc.data_ptr();
  a.k_block_stride = kc.stride(blk);
  a.k_token_stride = kc.stride(tok);
  a.k_head_stride = head < 0 ? 0 : kc.stride(head);
  a.v_block_stride = vc.stride(blk);
  a.v_token_stride = vc.stride(tok);
  a.v_head_stride = head < 0 ? 0 : vc.stride(head);
}

// New (prefill) keys / values: the (token, head) strides of dims tok and head.
void SetNew(OmniPagedAttnArgs& a, const at::Tensor& k, const at::Tensor& v, int tok, int head) {
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.kn_token_stride = k.stride(tok);
  a.kn_head_stride = k.stride(head);
  a.vn_token_stride = v.stride(tok);
  a.vn_head_stride = v.stride(head);
}

void SetTable(OmniPagedAttnArgs& a, const at::Tensor& table, const at::Tensor& lens, int64_t block_size) {
  a.block_size = block_size;
  a.block_table = table.data_ptr<int32_t>();
  a.table_stride = table.stride(0);
  a.ctx_lens = lens.data_ptr<int32_t>();
}

void SetShape(OmniPagedAttnArgs& a, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
              int64_t v_dim, double scale, int32_t dtype) {
  a.batch = batch;
  a.q_heads = q_heads;
  a.kv_heads = kv_heads;
  a.head_dim = head_dim;
  a.v_dim = v_dim;
  a.scale = static_cast<float>(scale);
  a.dtype = dtype;
}

void GqaDecode(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, double soft_cap,
               int64_t window) {
  const int32_t dt = CheckQKV(q, 3, k_cache, "k_cache", v_cache, "v_cache", 4);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2), Dv = v_cache.size(3);
  CheckDims(k_cache, "k_cache", {-1, -1, Hkv, D}, "num_blocks, block_size, kv_heads, head_dim of q");
  CheckDims(v_cache, "v_cache", {nb, bs, Hkv, -1}, "num_blocks, block_size, kv_heads as k_cache");
  if (Hkv <= 0 || Hq % Hkv != 0) ValueError("q: q_heads=" + S(Hq) + " must be a multiple of kv_heads=" + S(Hkv));
  if (bs <= 0) ValueError("k_cache: block_size must be > 0");
  if (D <= 0 || D > OMNI_ATTN_MAX_DECODE_DIM || Dv <= 0 || Dv > OMNI_ATTN_MAX_DECODE_DIM)
    ValueError("q: head dims must be in [1, " + S(OMNI_ATTN_MAX_DECODE_DIM) + "], got head_dim=" + S(D) + ", v_dim=" + S(Dv));
  CheckOut(out, q, B, Hq, Dv);
  CheckScale(scale, soft_cap);
  if (window < 0) ValueError("window: expected >= 0 (0 = no window), got " + S(window));
  const int64_t max_len = CheckTable(block_table, seq_lens, "seq_lens", B, nb, bs);
  if (B == 0 || Hq == 0) return;
  OmniPagedAttnArgs a{};
  SetRows(a, q, out, 0, 1);
  SetCache(a, k_cache, v_cache, 0, 1, 2);
  SetTable(a, block_table, seq_lens, bs);
  SetShape(a, B, Hq, Hkv, D, Dv, scale, dt);
  a.window = window;
  a.soft_cap = static_cast<float>(soft_cap);
  if (seq_lens.stride(0) != 1 && B > 1) ValueError("seq_lens: must be contiguous");
  LaunchDecode(a, max_len);
}

void MlaDecode(at::Tensor out, const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
               const at::Tensor& seq_lens, double scale, int64_t v_dim) {
  CheckReadable(q, "q", 3);
  const int32_t dt = FloatDType(q, "q");
  CheckReadable(kv_cache, "kv_cache", 3);
  CheckSameDtype(kv_cache, q, "kv_cache", "q");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  CheckDims(kv_cache, "kv_cache", {-1, -1, L}, "num_blocks, block_size, head_dim of q");
  const int64_t nb = kv_cache.size(0), bs = kv_cache.size(1);
  if (bs <= 0) ValueError("kv_cache: block_size must be > 0");
  if (L <= 0 || L > OMNI_ATTN_MAX_DECODE_DIM) ValueError("q: head_dim must be in [1, " + S(OMNI_ATTN_MAX_DECODE_DIM) + "], got " + S(L));
  if (v_dim <= 0 || v_dim > L) ValueError("v_dim: expected a value in [1, head_dim=" + S(L) + "], got " + S(v_dim));
  CheckOut(out, q, B, H, v_dim);
  CheckScale(scale, 0.0);
  const int64_t max_len = CheckTable(block_table, seq_lens, "seq_lens", B, nb, bs);
  if (seq_lens.stride(0) != 1 && B > 1) ValueError("seq_lens: must be contiguous");
  if (B == 0 || H == 0) return;
  OmniPagedAttnArgs a{};
  SetRows(a, q, out, 0, 1);
  SetCache(a, kv_cache, kv_cache, 0, 1, -1);
  SetTable(a, block_table, seq_lens, bs);
  SetShape(a, B, H, 1, L, v_dim, scale, dt);
  LaunchDecode(a, max_len);
}

void GqaPrefill(at::Tensor out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& cu_seqlens, bool causal, double scale, const std::optional<at::Tensor>& k_cache,
                const std::optional<at::Tensor>& v_cache, const std::optional<at::Tensor>& block_table,
                const std::optional<at::Tensor>& context_lens) {
  const int32_t dt = CheckQKV(q, 3, k, "k", v, "v", 3);
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), Dv = v.size(2);
  CheckDims(k, "k", {T, Hkv, D}, "tokens, kv_heads, head_dim of q");
  CheckDims(v, "v", {T, Hkv, -1}, "tokens, kv_heads as k");
  if (Hkv <= 0 || Hq % Hkv != 0) ValueError("q: q_heads=" + S(Hq) + " must be a multiple of kv_heads=" + S(Hkv));
  if (D <= 0 || D > OMNI_ATTN_MAX_PREFILL_DIM || Dv <= 0 || Dv > OMNI_ATTN_MAX_PREFILL_DIM)
    ValueError("q: head dims must be in [1, " + S(OMNI_ATTN_MAX_PREFILL_DIM) + "], got head_dim=" + S(D) + ", v_dim=" + S(Dv));
  CheckOut(out, q, T, Hq, Dv);
  CheckAlias(out, k, "out", "k");
  CheckAlias(out, v, "out", "v");
  CheckScale(scale, 0.0);
  CheckIndex(cu_seqlens, "cu_seqlens", at::kInt, 1);
  if (cu_seqlens.size(0) < 1) ValueError("cu_seqlens: expected [batch + 1] entries, got shape " + Shape(cu_seqlens));
  if (cu_seqlens.size(0) > 1 && cu_seqlens.stride(0) != 1) ValueError("cu_seqlens: must be contiguous");
  const int64_t B = cu_seqlens.size(0) - 1;
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  if (cu[0] != 0) ValueError("cu_seqlens[0] must be 0, got " + S(cu[0]));
  for (int64_t b = 0; b < B; ++b)
    if (cu[b + 1] < cu[b]) ValueError("cu_seqlens: must be non-decreasing (entry " + S(b + 1) + ")");
  if (cu[B] != T) ValueError("cu_seqlens[-1] = " + S(cu[B]) + " must equal the number of tokens " + S(T));
  const int n_cache = k_cache.has_value() + v_cache.has_value() + block_table.has_value() + context_lens.has_value();
  if (n_cache != 0 && n_cache != 4) ValueError("k_cache, v_cache, block_table, context_lens go together");
  OmniPagedAttnArgs a{};
  if (n_cache == 4) {
    const at::Tensor &kc = *k_cache, &vc = *v_cache;
    CheckReadable(kc, "k_cache", 4);
    CheckReadable(vc, "v_cache", 4);
    CheckSameDtype(kc, q, "k_cache", "q");
    CheckSameDtype(vc, q, "v_cache", "q");
    CheckDims(kc, "k_cache", {-1, -1, Hkv, D}, "num_blocks, block_size, kv_heads, head_dim as k");
    CheckDims(vc, "v_cache", {kc.size(0), kc.size(1), Hkv, Dv}, "as k_cache, v_dim of v");
    if (kc.size(1) <= 0) ValueError("k_cache: block_size must be > 0");
    CheckTable(*block_table, *context_lens, "context_lens", B, kc.size(0), kc.size(1));
    if (context_lens->stride(0) != 1 && B > 1) ValueError("context_lens: must be contiguous");
    SetCache(a, kc, vc, 0, 1, 2);
    SetTable(a, *block_table, *context_lens, kc.size(1));
  }
  if (T == 0 || Hq == 0) return;
  SetRows(a, q, out, 0, 1);
  SetNew(a, k, v, 0, 1);
  a.cu_seqlens = cu;
  SetShape(a, B, Hq, Hkv, D, Dv, scale, dt);
  a.num_splits = 1;
  a.causal = causal ? 1 : 0;
  OmniRuntime rt = Runtime();
  Kernels<OmniAttentionKernels>("omni_attention_kernels")->paged_attention(&a, &rt);
}

// Attention over contiguous K/V in SDPA layout (HF's DynamicCache): q [B, Hq, S, D], k [B, Hk, L, D],
// v [B, Hk, L, Dv], out [B, Hq, S, Dv], any strides with a unit inner one. The paged kernel serves it unchanged:
// sequence b's keys are one "block" of L slots (block_table[b] = b). S == 1 runs the split-KV decode over the
// batch; S > 1 runs the prefill once per sequence with the first L - S keys as the cached prefix and the last S
// as the new tokens (causal = bottom-right aligned, query s sees keys <= L - S + s). Optional mask [B|1, Hq|1,
// S, L]: bool (true = attend) or fp32 added to the scaled scores.
void DenseAttention(at::Tensor out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& mask, bool causal, double scale) {
  const int32_t dt = CheckQKV(q, 4, k, "k", v, "v", 4);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), L = k.size(2), Dv = v.size(3);
  CheckDims(k, "k", {B, -1, -1, D}, "batch of q, kv_heads, kv_len, head_dim of q");
  CheckDims(v, "v", {B, Hkv, L, -1}, "batch, kv_heads, kv_len as k");
  if (Hkv <= 0 || Hq % Hkv != 0) ValueError("q: q_heads=" + S(Hq) + " must be a multiple of kv_heads=" + S(Hkv));
  const int64_t max_dim = Sq == 1 ? OMNI_ATTN_MAX_DECODE_DIM : OMNI_ATTN_MAX_PREFILL_DIM;
  if (D <= 0 || D > max_dim || Dv <= 0 || Dv > max_dim)
    ValueError("q: head dims must be in [1, " + S(max_dim) + "], got head_dim=" + S(D) + ", v_dim=" + S(Dv));
  if (Sq > L) ValueError("q: query length " + S(Sq) + " exceeds the key length " + S(L) + " (keys include the queries)");
  CheckReadable(out, "out", 4);
  CheckSameDtype(out, q, "out", "q");
  CheckDims(out, "out", {B, Hq, Sq, Dv}, "batch, q_heads, q_len, v_dim");
  CheckAlias(out, q, "out", "q");
  CheckAlias(out, k, "out", "k");
  CheckAlias(out, v, "out", "v");
  if (out.numel() > 0 && ((Hq > 1 && out.stride(1) < Dv) || (Sq > 1 && out.stride(2) < Dv)))
    ValueError("out: rows overlap in memory");
  CheckScale(scale, 0.0);
  OmniPagedAttnArgs a{};
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    CheckCpu(m, "attn_mask");
    if (m.scalar_type() == at::kBool) a.mask_kind = OMNI_MASK_BOOL;
    else if (m.scalar_type() == at::kFloat) a.mask_kind = OMNI_MASK_ADD_F32;
    else TypeError("attn_mask: expected bool or float32, got " + std::string(c10::toString(m.scalar_type())));
    const bool ok = m.dim() == 4 && (m.size(0) == B || m.size(0) == 1) && (m.size(1) == Hq || m.size(1) == 1) &&
                    m.size(2) == Sq && m.size(3) == L;
    if (!ok) ValueError("attn_mask: expected shape [" + S(B) + " or 1, " + S(Hq) + " or 1, " + S(Sq) + ", " + S(L) +
                        "], got " + Shape(m));
    CheckReadable(m, "attn_mask", 4);
    a.mask = m.data_ptr();
    a.mask_batch_stride = m.size(0) == 1 ? 0 : m.stride(0);
    a.mask_head_stride = m.size(1) == 1 ? 0 : m.stride(1);
    a.mask_q_stride = m.stride(2);
  }
  if (out.numel() == 0) return;
  if (L == 0) {  // no keys: zero rows (as the kernels define an empty softmax)
    out.zero_();
    return;
  }
  SetCache(a, k, v, 0, 2, 1);  // sequence b = block b of L slots
  SetShape(a, B, Hq, Hkv, D, Dv, scale, dt);
  if (Sq == 1) {
    at::Tensor table = at::empty({B}, at::TensorOptions().dtype(at::kInt));
    at::Tensor lens = at::empty({B}, at::TensorOptions().dtype(at::kInt));
    for (int64_t b = 0; b < B; ++b) {
      table.data_ptr<int32_t>()[b] = static_cast<int32_t>(b);
      lens.data_ptr<int32_t>()[b] = static_cast<int32_t>(L);
    }
    SetRows(a, q, out, 0, 1);
    SetTable(a, table, lens, L);
    LaunchDecode(a, L);
    return;
  }
  // One prefill per sequence: the kernel indexes new tokens as cu_seqlens[b] * token_stride, which a batch
  // stride cannot express; each launch still spreads (kv head, head chunk, query tile) items over the cores.
  const int32_t table0 = 0, ctx = static_cast<int32_t>(L - Sq), cu[2] = {0, static_cast<int32_t>(Sq)};
  const size_t es = q.element_size();
  a.block_size = L;
  a.block_table = &table0;
  a.table_stride = 1;
  a.ctx_lens = &ctx;
  a.cu_seqlens = cu;
  a.batch = 1;
  a.num_splits = 1;
  a.causal = causal ? 1 : 0;
  SetRows(a, q, out, 2, 1);
  SetNew(a, k, v, 2, 1);
  const char* mask0 = static_cast<const char*>(a.mask);
  const int64_t mask_step = a.mask_batch_stride * (a.mask_kind == OMNI_MASK_BOOL ? 1 : 4);
  a.mask_batch_stride = 0;  // each launch sees one sequence (b = 0)
  OmniRuntime rt = Runtime();
  const OmniAttentionKernels* kern = Kernels<OmniAttentionKernels>("omni_attention_kernels");
  for (int64_t b = 0; b < B; ++b) {
    const char* kb = static_cast<const char*>(k.data_ptr()) + b * k.stride(0) * es;
    const char* vb = static_cast<const char*>(v.data_ptr()) + b * v.stride(0) * es;
    a.q = static_cast<const char*>(q.data_ptr()) + b * q.stride(0) * es;
    a.out = static_cast<char*>(out.data_ptr()) + b * out.stride(0) * es;
    a.k_cache = kb;
    a.v_cache = vb;
    a.k = kb + ctx * k.stride(2) * es;
    a.v = vb + ctx * v.stride(2) * es;
    if (mask0 != nullptr) a.mask = mask0 + b * mask_step;
    kern->paged_attention(&a, &rt);
  }
}

void ReshapeAndCache(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
                     const at::Tensor& slot_mapping) {
  CheckReadable(key, "key", 3);
  CheckReadable(value, "value", 3);
  const int32_t dt = FloatDType(key, "key");
  CheckSameDtype(value, key, "value", "key");
  CheckReadable(k_cache, "k_cache", 4);
  CheckReadable(v_cache, "v_cache", 4);
  CheckSameDtype(k_cache, key, "k_cache", "key");
  CheckSameDtype(v_cache, key, "v_cache", "key");
  const int64_t T = key.size(0), H = key.size(1), D = key.size(2), Dv = value.size(2);
  CheckDims(value, "value", {T, H, -1}, "tokens, kv_heads as key");
  CheckDims(k_cache, "k_cache", {-1, -1, H, D}, "num_blocks, block_size, kv_heads, head_dim of key");
  CheckDims(v_cache, "v_cache", {k_cache.size(0), k_cache.size(1), H, Dv}, "as k_cache, head_dim of value");
  CheckCacheWritable(k_cache, "k_cache");
  CheckCacheWritable(v_cache, "v_cache");
  CheckAlias(k_cache, v_cache, "k_cache", "v_cache");
  CheckAlias(k_cache, key, "k_cache", "key");
  CheckAlias(v_cache, value, "v_cache", "value");
  const int64_t bs = k_cache.size(1);
  CheckSlots(slot_mapping, T, k_cache.size(0) * bs);
  if (T == 0 || H == 0 || k_cache.numel() == 0) return;
  OmniReshapeAndCacheArgs a{};
  a.key = key.data_ptr();
  a.value = value.data_ptr();
  a.key_token_stride = key.stride(0);
  a.key_head_stride = key.stride(1);
  a.value_token_stride = value.stride(0);
  a.value_head_stride = value.stride(1);
  SetCache(a, k_cache, v_cache, 0, 1, 2);
  a.slot_mapping = slot_mapping.data_ptr<int64_t>();
  a.tokens = T;
  a.kv_heads = H;
  a.head_dim = D;
  a.v_dim = Dv;
  a.block_size = bs;
  a.dtype = dt;
  OmniRuntime rt = Runtime();
  Kernels<OmniAttentionKernels>("omni_attention_kernels")->reshape_and_cache(&a, &rt);
}

void MlaCache(const at::Tensor& kv_c, const at::Tensor& k_pe, at::Tensor kv_cache, const at::Tensor& slot_mapping) {
  CheckReadable(kv_c, "kv_c", 2);
  CheckReadable(k_pe, "k_pe", 2);
  const int32_t dt = FloatDType(kv_c, "kv_c");
  CheckSameDtype(k_pe, kv_c, "k_pe", "kv_c");
  CheckReadable(kv_cache, "kv_cache", 3);
  CheckSameDtype(kv_cache, kv_c, "kv_cache", "kv_c");
  const int64_t T = kv_c.size(0), R = kv_c.size(1), P = k_pe.size(1);
  CheckDims(k_pe, "k_pe", {T, -1}, "tokens as kv_c");
  CheckDims(kv_cache, "kv_cache", {-1, -1, R + P}, "num_blocks, block_size, kv_lora_rank + rope_dim");
  const int64_t nb = kv_cache.size(0), bs = kv_cache.size(1);
  if (kv_cache.numel() > 0 && ((bs > 1 && kv_cache.stride(1) < R + P) ||
                               (nb > 1 && kv_cache.stride(0) < (bs - 1) * kv_cache.stride(1) + R + P)))
    ValueError("kv_cache: blocks or slots overlap in memory");
  CheckAlias(kv_cache, kv_c, "kv_cache", "kv_c");
  CheckAlias(kv_cache, k_pe, "kv_cache", "k_pe");
  CheckSlots(slot_mapping, T, nb * bs);
  if (T == 0 || kv_cache.numel() == 0) return;
  OmniMlaCacheArgs a{};
  a.kv_c = kv_c.data_ptr();
  a.k_pe = k_pe.data_ptr();
  a.kv_c_stride = kv_c.stride(0);
  a.k_pe_stride = k_pe.stride(0);
  a.kv_cache = kv_cache.data_ptr();
  a.block_stride = kv_cache.stride(0);
  a.token_stride = kv_cache.stride(1);
  a.slot_mapping = slot_mapping.data_ptr<int64_t>();
  a.tokens = T;
  a.kv_lora_rank = R;
  a.rope_dim = P;
  a.block_size = bs;
  a.dtype = dt;
  OmniRuntime rt = Runtime();
  Kernels<OmniAttentionKernels>("omni_attention_kernels")->mla_cache(&a, &rt);
}

void Register(py::module_& m) {
  m.def("gqa_decode", &GqaDecode, py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("scale"), py::arg("soft_cap") = 0.0,
        py::arg("window") = 0, "paged GQA decode: out [B, Hq, Dv] from q [B, Hq, D] (split-KV)");
  m.def("mla_decode", &MlaDecode, py::arg("out"), py::arg("q"), py::arg("kv_cache"), py::arg("block_table"),
        py::arg("seq_lens"), py::arg("scale"), py::arg("v_dim"),
        "weight-absorbed MLA decode: out [B, H, v_dim] from q [B, H, L], latent cache [nb, bs, L]");
  m.def("gqa_prefill", &GqaPrefill, py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens"),
        py::arg("causal"), py::arg("scale"), py::arg("k_cache") = py::none(), py::arg("v_cache") = py::none(),
        py::arg("block_table") = py::none(), py::arg("context_lens") = py::none(),
        "varlen prefill with an optional paged prefix");
  m.def("dense_attention", &DenseAttention, py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("attn_mask") = py::none(), py::arg("causal") = false, py::arg("scale") = 1.0,
        "attention over contiguous K/V in SDPA layout: q [B, Hq, S, D], k/v [B, Hk, L, *], S <= L");
  m.def("reshape_and_cache", &ReshapeAndCache, py::arg("key"), py::arg("value"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slot_mapping"), "write key/value [T, H, D] into paged caches (slot -1 = skip)");
  m.def("mla_cache", &MlaCache, py::arg("kv_c"), py::arg("k_pe"), py::arg("kv_cache"), py::arg("slot_mapping"),
        "kv_cache[slot] = cat(kv_c, k_pe) (slot -1 = skip)");
}

RegisterFamily registered(FAMILY, &Register);

}  // namespace
}  // namespace omni
