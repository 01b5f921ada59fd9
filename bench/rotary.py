"""omni-bench rotary: Llama-style q 32 x 128 / k 8 x 128 heads, and DeepSeek-V3's 128 x 64-dim q_pe + 1 k_pe."""

from __future__ import annotations

import torch
from omniops.bench._ops import dtypes, our_backends, tokens_preset, with_backend
from omniops.bench.common import BenchOptions
from omniops.bench.peers import vllm_op
from omniops.bench.report import Case, compiled, run_routine
from rich.console import Console

import omniops
from omniops.reference.rotary import rotary_embedding as ref

NAME = "rotary"
# name, q heads, k heads, head_size, rotary_dim, is_neox
CONFIGS = [("llama 32/8x128", 32, 8, 128, 128, True), ("dsv3 q_pe 128/1x64", 128, 1, 64, 64, False)]


def cases(opts: BenchOptions) -> list[Case]:
    out: list[Case] = []
    v = vllm_op("rotary_embedding")
    ref_c = compiled(ref)
    for dname, dt in dtypes(opts):
        for label, hq, hk, hs, rd, neox in CONFIGS:
            inv = 1.0 / (10000 ** (torch.arange(0, rd, 2).float() / rd))
            f = torch.arange(8192)[:, None].float() * inv
            cache = torch.cat((f.cos(), f.sin()), -1).to(dt)
            for t in tokens_preset(opts):
                pos = torch.randint(0, 8192, (t,))
                q, k = torch.randn(t, hq * hs, dtype=dt), torch.randn(t, hk * hs, dtype=dt)
                nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
                c = Case(f"rotary {label}", f"T={t}", dname, nbytes)
                args = (pos, q, k, cache, hs, rd, neox)
                c.impls["eager"] = lambda a=args: ref(*a)
                c.impls["compile"] = lambda a=args: ref_c(*a)
                if v is not None:
                    c.impls["vllm"] = lambda p=pos, q=q, k=k, c_=cache, hs=hs, n=neox: v(p, q, k, hs, c_, n)
                for b in our_backends(opts):
                    c.impls[f"omni[{b}] inplace"] = with_backend(
                        b, lambda p=pos, q=q, k=k, c_=cache, hs=hs, rd=rd, n=neox:
                        omniops.rotary_embedding_(p, q, k, c_, hs, rd, n))
                    c.impls[f"omni[{b}]"] = with_backend(
                        b, lambda p=pos, q=q, k=k, c_=cache, hs=hs, rd=rd, n=neox:
                        omniops.rotary_embedding(p, q, k, c_, hs, rd, n))
                out.append(c)
    return out


def run(opts: BenchOptions, console: Console) -> list[dict]:
    return run_routine(NAME, "rotary_embedding", cases(opts), opts, console)
