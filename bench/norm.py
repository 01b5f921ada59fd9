"""omni-bench norm: rms_norm and fused add + rms_norm, hidden 7168 (DeepSeek-V3), tokens 1..4096."""

from __future__ import annotations

import torch
from omniops.bench._ops import dtypes, our_backends, tokens_preset, with_backend
from omniops.bench.common import BenchOptions
from omniops.bench.peers import vllm_op
from omniops.bench.report import Case, compiled, run_routine
from rich.console import Console

import omniops
from omniops.reference.norm import rms_norm as ref

NAME = "norm"
HIDDEN = 7168


def cases(opts: BenchOptions) -> list[Case]:
    out: list[Case] = []
    v_rms, v_fused = vllm_op("rms_norm"), vllm_op("fused_add_rms_norm")
    ref_c = compiled(ref)
    for dname, dt in dtypes(opts):
        for t in tokens_preset(opts):
            x, r = torch.randn(t, HIDDEN, dtype=dt), torch.randn(t, HIDDEN, dtype=dt)
            w, o = torch.randn(HIDDEN, dtype=dt), torch.empty(t, HIDDEN, dtype=dt)
            nb = x.numel() * x.element_size()
            # fused add + norm, in place (x <- norm(x + r), r <- x + r): reads x, r; writes both
            c = Case("add+rms_norm", f"[{t}, {HIDDEN}]", dname, 4 * nb)
            c.impls["eager"] = lambda x=x, r=r, w=w: ref(x, w, 1e-6, r)
            c.impls["compile"] = lambda x=x, r=r, w=w: ref_c(x, w, 1e-6, r)
            if v_fused is not None:
                c.impls["vllm"] = lambda x=x, r=r, w=w: v_fused(x, r, w, 1e-6)
            for b in our_backends(opts):
                c.impls[f"omni[{b}] inplace"] = with_backend(b, lambda x=x, r=r, w=w: omniops.rms_norm_(x, w, 1e-6, r))
                c.impls[f"omni[{b}]"] = with_backend(b, lambda x=x, r=r, w=w: omniops.rms_norm(x, w, 1e-6, r))
            out.append(c)
            c = Case("rms_norm", f"[{t}, {HIDDEN}]", dname, 2 * nb)
            c.impls["eager"] = lambda x=x, w=w: ref(x, w, 1e-6)
            c.impls["compile"] = lambda x=x, w=w: ref_c(x, w, 1e-6)
            if v_rms is not None:
                c.impls["vllm"] = lambda x=x, w=w, o=o: v_rms(o, x, w, 1e-6)
            for b in our_backends(opts):
                c.impls[f"omni[{b}] out="] = with_backend(b, lambda x=x, w=w, o=o: omniops.rms_norm(x, w, 1e-6, out=o))
            out.append(c)
    return out


def run(opts: BenchOptions, console: Console) -> list[dict]:
    return run_routine(NAME, "rms_norm (hidden 7168)", cases(opts), opts, console, "rms_norm")
