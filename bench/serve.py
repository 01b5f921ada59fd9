"""omni-bench serve: online serving, omni-serve vs vLLM-CPU (plain, and with the omniops plugin: ``vllm_omni``)
on the same checkpoint directory (issues 12, 15).

    omni-bench serve --model DIR [--targets omni,vllm,vllm_omni] [--concurrency 1,16] [--num-prompts N]
                     [--plot F] [--json F]

Each target is started as a subprocess on a free loopback port (one at a time: the machine has 2 cores), waited
for on /v1/models, loaded with streaming completions (~100-word prompts, 64 output tokens, ``ignore_eos``,
temperature 0) at each concurrency, and stopped by pid. One warm-up request precedes the runs of each server.
``--plot`` without ``--concurrency`` sweeps 1, 2, 4, 8, 16, 32.
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

from omniops.bench.common import BenchOptions
from omniops.bench.loadgen import completion_payload, make_prompts, run_load, stream_completion, summarize
from omniops.bench.servers import HOST, ROOT, Server, unavailable
from rich.console import Console
from rich.table import Table

NAME = "serve"
OUTPUT_TOKENS = 64
PROMPT_WORDS = 100
DEFAULT_CONCURRENCY = [1, 16]
SWEEP = [1, 2, 4, 8, 16, 32]
LOG_DIR = ROOT / "bench_out" / "logs"


def num_prompts(opts: BenchOptions, concurrency: int) -> int:
    return opts.num_prompts or max(16, 2 * concurrency)


def bench_target(target: str, model: str, concurrencies: list[int], opts: BenchOptions,
                 console: Console) -> list[dict]:
    """Start ``target``, run every concurrency on it, stop it; one row per concurrency."""
    log = LOG_DIR / f"serve_{target}_{Path(model).name}.log"
    console.print(f"[bold]{target}[/]: starting on {HOST} (log {log.relative_to(ROOT)})")
    rows = []
    with Server(target, model, log, threads=opts.threads) as srv:
        console.print(f"  ready after {srv.startup_s:.0f} s, port {srv.port}, model id {srv.model_id!r}")
        warm = asyncio.run(stream_completion(HOST, srv.port, completion_payload(srv.model_id, "warm up", 8)))
        if warm.error:
            raise RuntimeError(f"{target}: warm-up request failed: {warm.error}")
        for i, c in enumerate(concurrencies):
            # a fresh prompt set per run: no run is served from another's prefix cache
            prompts = make_prompts(num_prompts(opts, c), PROMPT_WORDS, seed=1000 + i)
            results, duration = asyncio.run(run_load(HOST, srv.port, srv.model_id, prompts, OUTPUT_TOKENS, c))
            row = {"target": target, "model": model, "concurrency": c, **summarize(results, duration),
                   "prompt_tokens_mean": _mean([r.prompt_tokens for r in results if r.prompt_tokens]),
                   "startup_s": srv.startup_s, "load_avg": os.getloadavg()[0], "threads_opt": opts.threads}
            console.print(f"  c={c}: {row['output_tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
                          f"ITL p50 {row['itl_p50_ms']:.1f} ms" + (f", {row['errors']} errors: "
                                                                     f"{row['first_error']}" if row["errors"] else ""))
            rows.append(row)
    return rows


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _fmt(v: float, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("target", "conc", "requests", "out tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms",
                "ITL p50 ms", "ITL p99 ms", "errors", "tok/s vs vLLM", "load avg"):
        t.add_column(col, justify="left" if col == "target" else "right")
    vllm = {r["concurrency"]: r for r in rows if r["target"] == "vllm"}
    for r in rows:
        peer = vllm.get(r["concurrency"])
        ratio = (r["output_tok_s"] / peer["output_tok_s"]) if r["target"] != "vllm" and peer and \
            peer["output_tok_s"] else None
        t.add_row(r["target"], str(r["concurrency"]), str(r["requests"]), _fmt(r["output_tok_s"]),
                  _fmt(r["req_s"], 2), _fmt(r["ttft_p50_ms"], 0), _fmt(r["ttft_p99_ms"], 0),
                  _fmt(r["itl_p50_ms"]), _fmt(r["itl_p99_ms"]), str(r["errors"]),
                  "-" if ratio is None else f"{ratio:.2f}x", _fmt(r.get("load_avg")))
    return t


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in dict.fromkeys(r["target"] for r in rows):
        rs = sorted((r for r in rows if r["target"] == target), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in rs]
        a.plot(cs, [r["output_tok_s"] for r in rs], "o-", label=target)
        b.plot(cs, [r["itl_p50_ms"] for r in rs], "o-", label=f"{target} ITL p50")
        b.plot(cs, [r["ttft_p50_ms"] for r in rs], "s--", label=f"{target} TTFT p50")
    ticks = sorted({r["concurrency"] for r in rows})
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.set_xlabel("concurrency")
        ax.grid(alpha=0.3)
        ax.legend()
    a.set_ylabel("output tokens/s")
    b.set_ylabel("ms")
    b.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(opts: BenchOptions, console: Console) -> list[dict]:
    if not opts.model:
        raise SystemExit("omni-bench serve: --model DIR is required (e.g. python -m omniops.serving.tiny DIR "
                         "--arch qwen3_moe --preset bench --dtype bfloat16)")
    model = str(Path(opts.model).resolve())
    concurrencies = opts.concurrency or (SWEEP if opts.plot else DEFAULT_CONCURRENCY)
    rows: list[dict] = []
    for target in opts.targets or ["omni", "vllm", "vllm_omni"]:
        why = unavailable(target)
        if why:
            console.print(f"[yellow]{target}: skipped[/] ({why})")
            continue
        try:
            rows += bench_target(target, model, concurrencies, opts, console)
        except (RuntimeError, TimeoutError) as e:
            console.print(f"[red]{target}: failed[/] {e}")
    title = (f"serve: {Path(model).name}, ~{PROMPT_WORDS}-word prompts, {OUTPUT_TOKENS} output tokens, "
             f"bf16, max_model_len 1024, threads {opts.threads or 'default'}")
    console.print(table(rows, title))
    path = opts.plot_path(NAME)
    if path and rows:
        plot(rows, path, title)
        console.print(f"wrote {path}")
    return rows
