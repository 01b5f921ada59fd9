"""omni-bench model: whole HF models (random weights, built from configs) — prefill and decode tokens/s for
eager, torch.compile (Inductor) and torch.compile(backend="omni") in one run (plus "omni+prepare" — the
registry route, fused_moe experts and moe_route routers — when the MoE ops exist).

Prefill: batch 1 x PREFILL tokens. Decode: batch DECODE_BATCH, one token per step on a DynamicCache that
starts at DECODE_CONTEXT tokens; the time per step is the median over DECODE_STEPS steps (cache marked dynamic, so
the compiled step is compiled once). Models run in the first ``--dtype`` (default float32: bf16 matmuls on
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

import omniops

NAME = "model"
PREFILL = 128
DECODE_BATCH = 4
DECODE_CONTEXT = 64
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


def _prefilled(fn, model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    M.mark_dynamic_inputs(ids)
    out = fn(input_ids=ids, cache=cache, use_cache=True)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return cache, tok


def time_model(fn, model, vocab: int, reps: int = REPS) -> dict[str, float]:
    """Median prefill and decode-step seconds of ``fn`` (a model or a compiled model)."""
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, vocab, (1, PREFILL), generator=g)
    decode_ids = torch.randint(0, vocab, (DECODE_BATCH, DECODE_CONTEXT), generator=g)
    pre, dec = [], []
    with torch.no_grad():
        _prefilled(fn, model, prefill_ids.clone())  # warm up / compile
        for _ in range(reps):
            t0 = time.perf_counter()
            _prefilled(fn, model, prefill_ids.clone())
            pre.append(time.perf_counter() - t0)
        for r in range(reps):
            cache, tok = _prefilled(fn, model, decode_ids.clone())
            for i in range(DECODE_STEPS + (2 if r == 0 else 0)):  # first rep: 2 warm-up steps (compile)
                M.mark_dynamic_inputs(tok, cache)
                t0 = time.perf_counter()
                out = fn(input_ids=tok, cache=cache, use_cache=True)
                dt = time.perf_counter() - t0
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                if r or i >= 2:
                    dec.append(dt)
    return {"prefill_s": statistics.median(pre), "decode_s": statistics.median(dec)}


def run(opts: BenchOptions, console: Console) -> list[dict]:
    from omniops.graph_passes import prepare, report, reset_report

    dtype = getattr(torch, opts.dtypes[0])
    has_moe_ops = hasattr(omniops, "fused_moe") and hasattr(omniops, "moe_route")
    if not has_moe_ops:
        console.print("[yellow]omniops.fused_moe / moe_route absent (fused_moe not merged yet): the MoE blocks stay "
                      "HF's grouped_mm experts in every column; the MoE decode target cannot be measured yet")
    rows: list[dict] = []
    reps = opts.reps or REPS
    for label, cfg in presets(opts.shapes):
        model = M.build(cfg, dtype)
        is_moe = hasattr(cfg, "num_experts_per_tok")
        impls = {"eager": lambda m=model: m,
                 "inductor": lambda m=model: torch.compile(m),
                 "omni": lambda m=model: torch.compile(m, backend="omni")}
        if is_moe and has_moe_ops:
            def _prepared(cfg=cfg):
                m = M.build(cfg, dtype)
                prepare(m)
                return torch.compile(m, backend="omni")
            impls["omni+prepare"] = _prepared
        times: dict[str, dict[str, float]] = {}
        for name, make in impls.items():
            torch._dynamo.reset()
            reset_report()
            console.print(f"{label}: {name} ...")
            fn = make()
            times[name] = time_model(fn, model, cfg.vocab_size, reps)
            if name.startswith("omni"):
                console.print(report().format())
        for name, t in times.items():
            rows.append({
                "model": label, "dtype": str(dtype).replace("torch.", ""), "impl": name,
                "prefill_ms": t["prefill_s"] * 1e3, "prefill_tok_s": PREFILL / t["prefill_s"],
                "decode_ms": t["decode_s"] * 1e3, "decode_tok_s": DECODE_BATCH / t["decode_s"],
                "decode_x_eager": times["eager"]["decode_s"] / t["decode_s"],
                "decode_x_inductor": times["inductor"]["decode_s"] / t["decode_s"],
                "prefill_x_inductor": times["inductor"]["prefill_s"] / t["prefill_s"],
            })
        del model
    _print(rows, console)
    return rows


def _print(rows: list[dict], console: Console) -> None:
    table = Table(title=f"HF models: prefill 1x{PREFILL} tokens, decode batch {DECODE_BATCH} "
                        f"at context ~{DECODE_CONTEXT}")
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
