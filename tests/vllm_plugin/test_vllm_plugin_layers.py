"""The plugin's layers and KV cache view against vLLM's own forwards / a dense reference, in-process (runs in
.venv-peers, where vLLM imports; no engine)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm.config", reason="vLLM is not importable here (run with .venv-peers' python)")
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402

from omniops.vllm.attention import split_kv_cache, write_kv  # noqa: E402
from omniops.vllm.layers import OmniRMSNorm, OmniRotaryEmbedding, OmniSiluAndMul  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


@pytest.fixture(autouse=True)
def _vllm_config():
    with set_current_vllm_config(VllmConfig()):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 96), (5, 3, 32)])  # hidden states; per-head (Qwen3's q/k norms)
def test_rms_norm_matches_vllm(dtype, shape):
    norm = OmniRMSNorm(shape[-1], eps=1e-6, dtype=dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x, res = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    assert norm._forward_method.__name__ == "forward_cpu" and norm._omni_why is None
    torch.testing.assert_close(norm(x), norm.forward_native(x), **TOL[dtype])
    y, s = norm(x, res.clone())
    y_ref, s_ref = norm.forward_native(x, res.clone())
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(s, s_ref, **TOL[dtype])


def test_rms_norm_without_weight_stays_vllm():
    norm = OmniRMSNorm(32, has_weight=False)
    assert norm._omni_why == "no weight (has_weight=False)"
    x = torch.randn(4, 32)
    torch.testing.assert_close(norm(x), norm.forward_native(x), atol=0, rtol=0)


def test_silu_and_mul_matches_vllm():
    act = OmniSiluAndMul()
    x = torch.randn(2, 5, 2 * 48)
    torch.testing.assert_close(act(x), act.forward_native(x), **TOL[torch.float32])


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotary_matches_vllm(neox, rotary_dim):
    rope = OmniRotaryEmbedding(64, rotary_dim, 256, 10000.0, neox, torch.float32)
    pos = torch.tensor([0, 3, 17, 200, 5])
    q, k = torch.randn(5, 4 * 64), torch.randn(5, 2 * 64)
    got = rope(pos, q.clone(), k.clone())
    want = rope.forward_native(pos, q.clone(), k.clone())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float32])
    # MLA's form: a strided slice of the heads' dims and a one-head key; key None (cross-layer KV sharing)
    qh = torch.randn(5, 4, 128 + 64)
    got_q, got_k = rope(pos, qh[..., 128:], k[:, :64].reshape(5, 1, 64))
    want_q, want_k = rope.forward_native(pos, qh[..., 128:].clone(), k[:, :64].reshape(5, 1, 64).clone())
    torch.testing.assert_close(got_q, want_q, **TOL[torch.float32])
    torch.testing.assert_close(got_k, want_k, **TOL[torch.float32])
    assert rope(pos, q.clone(), None)[1] is None


def test_kv_cache_view_with_omni_attention():
    """CPU_ATTN's cache as omni's per-block K / V: what write_kv scatters is what gqa_decode / gqa_prefill read."""
    import omniops

    nb, hk, bs, d, hq = 6, 2, 32, 16, 4
    cache = torch.zeros(nb, hk, bs, 2 * d)
    lens = [37, 5]  # sequence 0 spans two blocks
    table = torch.tensor([[4, 1], [2, 0]], dtype=torch.int32)
    keys = [torch.randn(n, hk, d) for n in lens]
    vals = [torch.randn(n, hk, d) for n in lens]
    for b, n in enumerate(lens):
        slots = torch.tensor([int(table[b, i // bs]) * bs + i % bs for i in range(n)])
        write_kv(cache, torch.cat([keys[b], keys[b][:1]]), torch.cat([vals[b], vals[b][:1]]),
                 torch.cat([slots, torch.tensor([-1])]), hk, d)  # a padding slot (-1) is skipped
    k_cache, v_cache = split_kv_cache(cache, hk, d)
    assert k_cache.data_ptr() == cache.data_ptr() and k_cache.shape == (nb, bs, hk, d)

    q = torch.randn(2, hq, d)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = omniops.gqa_decode(q, k_cache, v_cache, table, seq_lens)
    for b in range(len(lens)):  # dense reference: the last token of each sequence attends to all of it
        k, v = keys[b].repeat_interleave(hq // hk, 1), vals[b].repeat_interleave(hq // hk, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b], k) / math.sqrt(d), -1)
        torch.testing.assert_close(out[b], torch.einsum("hn,nhd->hd", p, v), atol=1e-5, rtol=1e-5)
    # the same, as one new token per sequence after its cached prefix (what a mixed batch runs)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    new_k = torch.stack([keys[b][-1] for b in range(2)])
    new_v = torch.stack([vals[b][-1] for b in range(2)])
    pre = omniops.gqa_prefill(q, new_k, new_v, cu, k_cache=k_cache, v_cache=v_cache, block_table=table,
                              context_lens=seq_lens - 1)
    torch.testing.assert_close(pre, out, atol=1e-5, rtol=1e-5)


def test_split_kv_cache_names_the_argument():
    with pytest.raises(ValueError, match="kv_cache: expected"):
        split_kv_cache(torch.zeros(2, 3, 4, 10), 3, 4)
