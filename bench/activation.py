"""omni-bench activation: silu_and_mul on [T, 2 x 7168] (DeepSeek-V3's dense MLP is 18432; 7168 as issued)."""

from __future__ import annotations

import torch
from omniops.bench._ops import dtypes, our_backends, tokens_preset, with_backend
from omniops.bench.common import BenchOptions
from omniops.bench.peers import vllm_op
from omniops.bench.report import Case, compiled, run_routine
from rich.console import Console

import omniops
from omniops.reference.activation import silu_and_mul as ref

NAME = "activation"
D = 7168


def cases(opts: BenchOptions) -> list[Case]:
    out: list[Case] = []
    v = vllm_op("silu_and_mul")
    ref_c = compiled(ref)
    for dname, dt in dtypes(opts):
        for t in tokens_preset(opts):
            x, o = torch.randn(t, 2 * D, dtype=dt), torch.empty(t, D, dtype=dt)
            c = Case("silu_and_mul", f"[{t}, 2x{D}]", dname, 3 * o.numel() * o.element_size())
            c.impls["eager"] = lambda x=x: ref(x)
            c.impls["compile"] = lambda x=x: ref_c(x)
            if v is not None:
                c.impls["vllm"] = lambda x=x, o=o: v(o, x)
            for b in our_backends(opts):
                c.impls[f"omni[{b}] out="] = with_backend(b, lambda x=x, o=o: omniops.silu_and_mul(x, out=o))
                c.impls[f"omni[{b}]"] = with_backend(b, lambda x=x: omniops.silu_and_mul(x))
            out.append(c)
    return out


def run(opts: BenchOptions, console: Console) -> list[dict]:
    return run_routine(NAME, "silu_and_mul", cases(opts), opts, console)
