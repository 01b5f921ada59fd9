"""omni-bench model: whole HF models (random weights, built from configs) — prefill and decode tokens/s for
eager, torch.compile (Inductor) and torch.compile(backend="omni") in one run (plus "omni+prepare" — the
registry route, fused_moe experts and moe_route routers — when the MoE ops exist).

Prefill: BATCH x CONTEXT tokens. Decode: batch BATCH, one token per sequence per step on the DynamicCache of
that prefill; the time per step is the median over REPS x DECODE_STEPS steps (batch, sequence and cache length
marked dynamic: each implementation compiles one prefill and one decode graph). Timings are interleaved across
implementations. Models run in the first ``--dtype`` (default float32: bf16 matmuls on
an AVX2 CPU without AMX are emulated and slow in every column).
"""

from __future__ import annotations

import statistics
import time

import torch
from omniops.bench.common import BenchOptions
from omniops.graph_passes import models as M
from rich.console import Console
from rich.table import Table

NAME = "model"
BATCH = 4
CONTEXT = 64
DECODE_STEPS = 8
REPS = 2


def presets(shapes: str) -> list[tuple[str, object]]:
    ds = ("DeepSeek-V3 layout H=1024 L=2 (1 dense + 1 MoE), 32 experts top-4",
          M.deepseek_v3_config(hidden=1024, layers=2, experts=32, top_k=4, groups=4, topk_groups=2,
                               dense_layers=1, vocab=4096, heads=8))
    llama = ("Llama H=1024 L=2", M.llama_config(hidden=1024, layers=2, vocab=4096, heads=8, kv_heads=2))
    if shapes == "quick":
        return [ds, llama]
    return [
        ("DeepSeek-V3 layout H=1024 L=4 (1 dense + 3 MoE), 64 experts top-8",
         M.deepseek_v3_config(hidden=1024, layers=4, experts=64, top_k=8, groups=8, topk_groups=4,
                              dense_layers=1, vocab=4096, heads=8)),
        ("Qwen3-MoE H=1024 L=2, 32 experts top-4",
         M.qwen3_moe_config(hidden=1024, layers=2, experts=32, top_k=4, vocab=4096, heads=8, kv_heads=2)),
        llama,
    ]


def _prefill(fn, model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    M.mark_dynamic_inputs(ids)
    out = fn(input_ids=ids, cache=cache, use_cache=True)
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def _step(fn, cache, tok):
    M.mark_dynamic_inputs(tok, cache)
    out = fn(input_ids=tok, cache=cache, use_cache=True)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def time_models(impls: dict[str, tuple], vocab: int, reps: int = REPS) -> dict[str, dict[str, float]]:
    """Median prefill and decode-step seconds per implementation ({name: (fn, model)}). Measurements are
    interleaved across the implementations (step by step), so load changes on a shared machine hit all alike."""
    ids = torch.randint(0, vocab, (BATCH, CONTEXT), generator=torch.Generator().manual_seed(0))
    pre: dict[str, list[float]] = {n: [] for n in impls}
    dec: dict[str, list[float]] = {n: [] for n in impls}
    with torch.no_grad():
        for fn, model in impls.values():  # compile: prefill graph, decode graph
            cache, tok = _prefill(fn, model, ids.clone())
            for _ in range(2):
                tok = _step(fn, cache, tok)
        for _ in range(reps):
            state = {}
            for n, (fn, model) in impls.items():
                t0 = time.perf_counter()
                state[n] = _prefill(fn, model, ids.clone())
                pre[n].append(time.perf_counter() - t0)
            for _ in range(DECODE_STEPS):
                for n, (fn, _model) in impls.items():
                    cache, tok = state[n]
                    t0 = time.perf_counter()
                    tok = _step(fn, cache, tok)
                    dec[n].append(time.perf_counter() - t0)
                    state[n] = (cache, tok)
    return {n: {"prefill_s": statistics.median(pre[n]), "decode_s": statistics.median(dec[n])} for n in impls}


def run(opts: BenchOptions, console: Console) -> list[dict]:
    from omniops.graph_passes import prepare, report, reset_report

    dtype = getattr(torch, opts.dtypes[0])
    rows: list[dict] = []
    reps = opts.reps or REPS
    for label, cfg in presets(opts.shapes):
        is_moe = hasattr(cfg, "num_experts_per_tok")
        torch._dynamo.reset()
        reset_report()
        impls: dict[str, tuple] = {}
        m = M.build(cfg, dtype)
        impls["eager"] = (m, m)
        m = M.build(cfg, dtype)  # one model per implementation (same weights): separate Dynamo caches
        impls["inductor"] = (torch.compile(m), m)
        m = M.build(cfg, dtype)
        impls["omni"] = (torch.compile(m, backend="omni"), m)
        if is_moe:
            m = M.build(cfg, dtype)
            prepare(m)
            impls["omni+prepare"] = (torch.compile(m, backend="omni"), m)
        console.print(f"{label}: compiling and timing {', '.join(impls)} (interleaved) ...")
        with torch._dynamo.config.patch(recompile_limit=64):
            times = time_models(impls, cfg.vocab_size, reps)
        console.print(report().format())
        for name, t in times.items():
            rows.append({
                "model": label, "dtype": str(dtype).replace("torch.", ""), "impl": name,
                "prefill_ms": t["prefill_s"] * 1e3, "prefill_tok_s": BATCH * CONTEXT / t["prefill_s"],
                "decode_ms": t["decode_s"] * 1e3, "decode_tok_s": BATCH / t["decode_s"],
                "decode_x_eager": times["eager"]["decode_s"] / t["decode_s"],
                "decode_x_inductor": times["inductor"]["decode_s"] / t["decode_s"],
                "prefill_x_inductor": times["inductor"]["prefill_s"] / t["prefill_s"],
            })
        del impls
    _print(rows, console)
    return rows


def _print(rows: list[dict], console: Console) -> None:
    table = Table(title=f"HF models: prefill {BATCH}x{CONTEXT} tokens, then decode batch {BATCH} (one token "
                        f"per sequence per step) at context ~{CONTEXT}")
    for col in ("model", "dtype", "impl", "prefill ms", "prefill tok/s", "decode ms/step", "decode tok/s",
                "decode x eager", "decode x inductor", "prefill x inductor"):
        table.add_column(col, justify="left" if col in ("model", "dtype", "impl") else "right")
    for r in rows:
        table.add_row(r["model"], r["dtype"], r["impl"], f"{r['prefill_ms']:.1f}", f"{r['prefill_tok_s']:.0f}",
                      f"{r['decode_ms']:.2f}", f"{r['decode_tok_s']:.1f}", f"{r['decode_x_eager']:.2f}",
                      f"{r['decode_x_inductor']:.2f}", f"{r['prefill_x_inductor']:.2f}",
                      style="bold" if r["impl"].startswith("omni") else None)
    console.print(table)


if __name__ == "__main__":
    import sys

    # `omni-bench model` once cli.ROUTINES lists "model"; until then: python -m omniops.bench.model [--shapes ...]
    from omniops.bench import cli
    from omniops.bench.cli import main

    cli.ROUTINES.setdefault(NAME, NAME)
    sys.exit(main([NAME, *sys.argv[1:]]))
