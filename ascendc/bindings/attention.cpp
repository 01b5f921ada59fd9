// Bindings of the attention family (ascendc/kernels/attention/): decode, prefill, dense attention. Every shape,
// stride and index value is checked here before a kernel runs, because omniops._C is reachable directly. Index
// checks read block_table / seq_lens (one pass over the covered entries) and cu_seqlens. Cache writes:
// cache_ops.cpp.
#include <algorithm>

#include "bindings/attention_common.h"

namespace omni {
constexpr const char* FAMILY = "attention";
namespace {

// block_table [B, max_blocks] int32 and lengths [B] int32: lengths in [0, max_blocks * block_size] and the table
// entries the lengths cover in [0, num_blocks). Returns the largest length. block_size may be huge (a stride-0
// cache view): the arithmetic saturates instead of wrapping, so no entry escapes the check.
int64_t CheckTable(const at::Tensor& table, const at::Tensor& lens, const char* lens_name, int64_t batch,
                   int64_t num_blocks, int64_t block_size) {
  CheckIndex(table, "block_table", at::kInt, 2);
  CheckIndex(lens, lens_name, at::kInt, 1);
  if (table.size(0) != batch) ValueError("block_table: expected " + S(batch) + " rows (one per sequence), got shape " + Shape(table));
  if (lens.size(0) != batch) ValueError(std::string(lens_name) + ": expected shape [" + S(batch) + "], got " + Shape(lens));
  const int64_t max_blocks = table.size(1);
  const int64_t cap = max_blocks > 0 && block_size > INT64_MAX / max_blocks ? INT64_MAX : max_blocks * block_size;
  const int32_t* l = lens.data_ptr<int32_t>();
  const int32_t* t = table.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = l[b * lens.stride(0)];
    if (n < 0 || n > cap)
      ValueError(std::string(lens_name) + "[" + S(b) + "] = " + S(n) + " is outside [0, " + S(cap) +
                 "] (block_table covers " + S(max_blocks) + " blocks of " + S(block_size) + " tokens)");
    max_len = std::max(max_len, n);
    const int64_t nblk = DivUp(n, block_size);
    for (int64_t j = 0; j < nblk; ++j) {
      const int64_t id = t[b * table.stride(0) + j];
      if (id < 0 || id >= num_blocks)
        ValueError("block_table[" + S(b) + ", " + S(j) + "] = " + S(id) + " is outside [0, " + S(num_blocks) +
                   ") (num_blocks of the cache)");
    }
  }
  return max_len;
}

void CheckOut(const at::Tensor& out, const at::Tensor& q, int64_t rows, int64_t heads, int64_t dv) {
  CheckSameDtype(out, q, "out", "q");
  CheckDims(out, "out", {rows, heads, dv}, "rows, q_heads, v_dim");
  if (!out.is_contiguous()) ValueError("out: must be contiguous");
}

// q (float, q_dim dims) and k / v (or the k / v caches; kv_dim dims): readable, k and v of q's dtype. Checks the
// int32 limit of the kernels' per-item row counts. Returns q's OmniDType.
int32_t CheckQKV(const at::Tensor& q, int64_t q_dim, const at::Tensor& k, const char* k_name, const at::Tensor& v,
                 const char* v_name, int64_t kv_dim) {
  CheckReadable(q, "q", q_dim);
  const int32_t dt = FloatDType(q, "q");
  CheckReadable(k, k_name, kv_dim);
  CheckReadable(v, v_name, kv_dim);
  CheckSameDtype(k, q, k_name, "q");
  CheckSameDtype(v, q, v_name, "q");
  CheckLimit(q.size(1), kMaxInt32, "q", "q_heads");
  return dt;
}

void CheckHeads(int64_t hq, int64_t hkv, const char* kv_name) {
  if (hkv <= 0 || hq % hkv != 0)
    ValueError("q: q_heads=" + S(hq) + " must be a multiple of kv_heads=" + S(hkv) + " (" + kv_name + ")");
}

void CheckHeadDims(int64_t d, int64_t dv, int64_t limit) {
  if (d <= 0 || d > limit || dv <= 0 || dv > limit)
    ValueError("q: head dims must be in [1, " + S(limit) + "], got head_dim=" + S(d) + ", v_dim=" + S(dv));
}

// Argument setup shared by the entry points (after their checks).
// q / out rows: the (token, head) strides of dims 0 and 1.
void SetRows(OmniPagedAttnArgs& a, const at::Tensor& q, const at::Tensor& out) {
  SetTokenRows(q, a.q, a.q_token_stride, a.q_head_stride);
  SetTokenRows(out, a.out, a.out_token_stride, a.out_head_stride);
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

void LaunchDecode(OmniPagedAttnArgs& a, int64_t max_len) {
  OmniRuntime rt = Runtime();
  const int64_t bytes = K()->plan_decode(&a, max_len, &rt);
  a.workspace = static_cast<float*>(Workspace(bytes));
  K()->paged_attention(&a, &rt);
}

void GqaDecode(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, double soft_cap,
               int64_t window) {
  const int32_t dt = CheckQKV(q, 3, k_cache, "k_cache", v_cache, "v_cache", 4);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2), Dv = v_cache.size(3);
  CheckDims(k_cache, "k_cache", {-1, -1, Hkv, D}, "num_blocks, block_size, kv_heads, head_dim of q");
  CheckDims(v_cache, "v_cache", {nb, bs, Hkv, -1}, "num_blocks, block_size, kv_heads as k_cache");
  CheckHeads(Hq, Hkv, "k_cache dim 2");
  if (bs <= 0) ValueError("k_cache: block_size must be > 0");
  CheckHeadDims(D, Dv, OMNI_ATTN_MAX_DECODE_DIM);
  CheckOut(out, q, B, Hq, Dv);
  if (!(soft_cap >= 0.0)) ValueError("soft_cap: expected a finite value >= 0 (0 = none), got " + std::to_string(soft_cap));
  if (window < 0) ValueError("window: expected >= 0 (0 = no window), got " + S(window));
  CheckOutputs({{&out, "out"}}, {{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                                 {&block_table, "block_table"}, {&seq_lens, "seq_lens"}});
  const int64_t max_len = CheckTable(block_table, seq_lens, "seq_lens", B, nb, bs);
  if (seq_lens.stride(0) != 1 && B > 1) ValueError("seq_lens: must be contiguous");
  if (B == 0 || Hq == 0) return;
  OmniPagedAttnArgs a{};
  SetRows(a, q, out);
  SetCache(a, k_cache, v_cache, true);
  SetTable(a, block_table, seq_lens, bs);
  SetShape(a, B, Hq, Hkv, D, Dv, scale, dt);
  a.window = window;
  a.soft_cap = static_cast<float>(soft_cap);
  LaunchDecode(a, max_len);
}

void MlaDecode(at::Tensor out, const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
               const at::Tensor& seq_lens, double scale, int64_t v_dim) {
  const int32_t dt = CheckQKV(q, 3, kv_cache, "kv_cache", kv_cache, "kv_cache", 3);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  CheckDims(kv_cache, "kv_cache", {-1, -1, L}, "num_blocks, block_size, head_dim of q");
  const int64_t nb = kv_cache.size(0), bs = kv_cache.size(1);
  if (bs <= 0) ValueError("kv_cache: block_size must be > 0");
  if (L <= 0 || L > OMNI_ATTN_MAX_DECODE_DIM) ValueError("q: head_dim must be in [1, " + S(OMNI_ATTN_MAX_DECODE_DIM) + "], got " + S(L));
  if (v_dim <= 0 || v_dim > L) ValueError("v_dim: expected a value in [1, head_dim=" + S(L) + "], got " + S(v_dim));
  CheckOut(out, q, B, H, v_dim);
  CheckOutputs({{&out, "out"}}, {{&q, "q"}, {&kv_cache, "kv_cache"}, {&block_table, "block_table"},
                                 {&seq_lens, "seq_lens"}});
  const int64_t max_len = CheckTable(block_table, seq_lens, "seq_lens", B, nb, bs);
  if (seq_lens.stride(0) != 1 && B > 1) ValueError("seq_lens: must be contiguous");
  if (B == 0 || H == 0) return;
  OmniPagedAttnArgs a{};
  SetRows(a, q, out);
  SetCache(a, kv_cache, kv_cache, false);
  SetTable(a, block_table, seq_lens, bs);
  SetShape(a, B, H, 1, L, v_dim, scale, dt);
  LaunchDecode(a, max_len);
}

// cu_seqlens [B + 1] int32: 0, non-decreasing, ending at the token count. Returns B.
int64_t CheckCuSeqlens(const at::Tensor& cu_seqlens, int64_t tokens) {
  CheckIndex(cu_seqlens, "cu_seqlens", at::kInt, 1);
  if (cu_seqlens.size(0) < 1) ValueError("cu_seqlens: expected [batch + 1] entries, got shape " + Shape(cu_seqlens));
  if (cu_seqlens.size(0) > 1 && cu_seqlens.stride(0) != 1) ValueError("cu_seqlens: must be contiguous");
  const int64_t B = cu_seqlens.size(0) - 1;
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  if (cu[0] != 0) ValueError("cu_seqlens[0] must be 0, got " + S(cu[0]));
  for (int64_t b = 0; b < B; ++b)
    if (cu[b + 1] < cu[b]) ValueError("cu_seqlens: must be non-decreasing (entry " + S(b + 1) + ")");
  if (cu[B] != tokens) ValueError("cu_seqlens[-1] = " + S(cu[B]) + " must equal the number of tokens " + S(tokens));
  return B;
}

void GqaPrefill(at::Tensor out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& cu_seqlens, bool causal, double scale, const std::optional<at::Tensor>& k_cache,
                const std::optional<at::Tensor>& v_cache, const std::optional<at::Tensor>& block_table,
                const std::optional<at::Tensor>& context_lens) {
  const int32_t dt = CheckQKV(q, 3, k, "k", v, "v", 3);
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), Dv = v.size(2);
  CheckDims(k, "k", {T, Hkv, D}, "tokens, kv_heads, head_dim of q");
  CheckDims(v, "v", {T, Hkv, -1}, "tokens, kv_heads as k");
  CheckHeads(Hq, Hkv, "k dim 1");
  CheckHeadDims(D, Dv, OMNI_ATTN_MAX_PREFILL_DIM);
  CheckOut(out, q, T, Hq, Dv);
  const int n_cache = k_cache.has_value() + v_cache.has_value() + block_table.has_value() + context_lens.has_value();
  if (n_cache != 0 && n_cache != 4) ValueError("k_cache, v_cache, block_table, context_lens go together");
  CheckOutputs({{&out, "out"}}, {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&cu_seqlens, "cu_seqlens"},
                                 {Opt(k_cache), "k_cache"}, {Opt(v_cache), "v_cache"},
                                 {Opt(block_table), "block_table"}, {Opt(context_lens), "context_lens"}});
  const int64_t B = CheckCuSeqlens(cu_seqlens, T);
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
    SetCache(a, kc, vc, true);
    SetTable(a, *block_table, *context_lens, kc.size(1));
  }
  if (T == 0 || Hq == 0) return;
  SetRows(a, q, out);
  SetTokenRows(k, a.k, a.kn_token_stride, a.kn_head_stride);
  SetTokenRows(v, a.v, a.vn_token_stride, a.vn_head_stride);
  a.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  SetShape(a, B, Hq, Hkv, D, Dv, scale, dt);
  a.num_splits = 1;
  a.causal = causal ? 1 : 0;
  OmniRuntime rt = Runtime();
  K()->paged_attention(&a, &rt);
}

// The attention mask of dense_attention: [B|1, Hq|1, S, L], bool (true = attend) or fp32 (added).
void SetMask(OmniDenseAttnArgs& a, const at::Tensor& m, int64_t B, int64_t Hq, int64_t Sq, int64_t L) {
  if (m.scalar_type() == at::kBool) a.mask_kind = OMNI_MASK_BOOL;
  else if (m.scalar_type() == at::kFloat) a.mask_kind = OMNI_MASK_ADD_F32;
  else TypeError("attn_mask: expected bool or float32, got " + DtypeName(m.scalar_type()));
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

// Attention over contiguous K/V in SDPA layout (HF's DynamicCache): q [B, Hq, S, D], k [B, Hk, L, D],
// v [B, Hk, L, Dv], out [B, Hq, S, Dv], any strides with a unit inner one; S <= L (the keys include the
// queries); the scheduling is the kernel's (kernels/attention/attention_plan.h).
void DenseAttention(at::Tensor out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& mask, bool causal, double scale) {
  const int32_t dt = CheckQKV(q, 4, k, "k", v, "v", 4);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), L = k.size(2), Dv = v.size(3);
  CheckDims(k, "k", {B, -1, -1, D}, "batch of q, kv_heads, kv_len, head_dim of q");
  CheckDims(v, "v", {B, Hkv, L, -1}, "batch, kv_heads, kv_len as k");
  CheckHeads(Hq, Hkv, "k dim 1");
  CheckHeadDims(D, Dv, Sq == 1 ? OMNI_ATTN_MAX_DECODE_DIM : OMNI_ATTN_MAX_PREFILL_DIM);
  if (Sq > L) ValueError("q: query length " + S(Sq) + " exceeds the key length " + S(L) + " (keys include the queries)");
  // Key positions, the batch (the block ids of the decode) and the prefix length are int32 in the kernels.
  CheckLimit(L, kMaxInt32, "k", "kv_len (dim 2)");
  CheckLimit(B, kMaxInt32, "q", "batch (dim 0)");
  CheckReadable(out, "out", 4);
  CheckSameDtype(out, q, "out", "q");
  CheckDims(out, "out", {B, Hq, Sq, Dv}, "batch, q_heads, q_len, v_dim");
  OmniDenseAttnArgs a{};
  if (mask.has_value()) SetMask(a, *mask, B, Hq, Sq, L);
  CheckOutputs({{&out, "out"}}, {{&q, "q"}, {&k, "k"}, {&v, "v"}, {Opt(mask), "attn_mask"}});
  if (out.numel() == 0) return;
  if (L == 0) {  // no keys: zero rows (as the kernels define an empty softmax)
    out.zero_();
    return;
  }
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  for (int d = 0; d < 3; ++d) {
    a.q_strides[d] = q.stride(d);
    a.k_strides[d] = k.stride(d);
    a.v_strides[d] = v.stride(d);
    a.out_strides[d] = out.stride(d);
  }
  a.batch = B;
  a.q_heads = Hq;
  a.kv_heads = Hkv;
  a.q_len = Sq;
  a.kv_len = L;
  a.head_dim = D;
  a.v_dim = Dv;
  a.scale = static_cast<float>(scale);
  a.causal = causal ? 1 : 0;
  a.dtype = dt;
  OmniRuntime rt = Runtime();
  a.workspace = Workspace(K()->dense_attention_workspace(&a, &rt));
  K()->dense_attention(&a, &rt);
}

void Register(py::module_& m) {
  Def(m, "gqa_decode", &GqaDecode, "paged GQA decode: out [B, Hq, Dv] from q [B, Hq, D] (split-KV)", py::arg("out"),
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"), py::arg("seq_lens"),
      py::arg("scale"), py::arg("soft_cap") = 0.0, py::arg("window") = 0);
  Def(m, "mla_decode", &MlaDecode,
      "weight-absorbed MLA decode: out [B, H, v_dim] from q [B, H, L], latent cache [nb, bs, L]", py::arg("out"),
      py::arg("q"), py::arg("kv_cache"), py::arg("block_table"), py::arg("seq_lens"), py::arg("scale"),
      py::arg("v_dim"));
  Def(m, "gqa_prefill", &GqaPrefill, "varlen prefill with an optional paged prefix", py::arg("out"), py::arg("q"),
      py::arg("k"), py::arg("v"), py::arg("cu_seqlens"), py::arg("causal"), py::arg("scale"),
      py::arg("k_cache") = py::none(), py::arg("v_cache") = py::none(), py::arg("block_table") = py::none(),
      py::arg("context_lens") = py::none());
  Def(m, "dense_attention", &DenseAttention,
      "attention over contiguous K/V in SDPA layout: q [B, Hq, S, D], k/v [B, Hk, L, *], S <= L", py::arg("out"),
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_mask") = py::none(), py::arg("causal") = false,
      py::arg("scale") = 1.0);
}

RegisterFamily registered(FAMILY, &Register);

}  // namespace
}  // namespace omni
