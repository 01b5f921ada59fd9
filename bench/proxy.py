"""omni-bench proxy: omni-proxy's policies against 2 mixed omni-serve engines, vLLM's router as the peer (issue 13).

    omni-bench proxy [--model DIR] [--targets omni,vllm,pd] [--num-prompts N] [--json F]

Workloads (the same requests, arrival times and lengths for every router; fresh prompt text per run, so no run
is served from another's prefix cache):

* bursty: prompt lengths log-uniform over 16..2048 tokens, outputs log-uniform over 16..256, arriving in bursts
  of ``BURST`` requests every ``BURST_GAP_S`` seconds;
* prefix-heavy: ``NUM_PREFIXES`` shared ~768-token system prompts (Zipf-chosen) + a unique 16..64-token
  question, 32 output tokens, Poisson arrivals.

Per run: TTFT p50/p99, ITL p99, output tokens/s, and the engines' prefix-cache hit rate (their
omni:prefix_cache_hits_total / queries_total deltas). Targets: ``omni`` (each omni-proxy policy), ``vllm``
(vllm-router power_of_two and cache_aware from .venv-peers, skipped when absent), ``pd`` (1P1D through
omni-proxy on the bursty load, against the same 2 cores). Engines are eager (``--enforce-eager``) bf16, with
exact prompt lengths for omni-proxy (``--tokenizer``). Without --model a checkpoint is written to bench_out/.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
from omniops.bench.common import BenchOptions
from omniops.bench.loadgen import completion_payload, stream_completion, summarize
from omniops.bench.servers import HOST, ROOT, free_port
from rich.console import Console
from rich.table import Table

NAME = "proxy"
LOG_DIR = ROOT / "bench_out" / "logs"
ROUTER = ROOT / ".venv-peers" / "bin" / "vllm-router"
BURST, BURST_GAP_S = 12, 5.0
NUM_PREFIXES, PREFIX_TOKENS, PREFIX_RATE = 6, 768, 3.0
OMNI_BURSTY = ("round_robin", "least_outstanding", "power_of_two", "cache_aware", "prefill_score_balance",
               "length_balance", "length_bucket")
OMNI_PREFIX = ("round_robin", "least_outstanding", "cache_aware")
VLLM_POLICIES = ("power_of_two", "cache_aware")
ENGINE_ARGS = ("--dtype", "bfloat16", "--max-model-len", "2560", "--kv-cache-memory", "1", "--enforce-eager",
               "--disable-log-requests", "--disable-uvicorn-access-log", "--served-model-name", "bench")


def _model(opts: BenchOptions) -> str:
    if opts.model:
        return str(Path(opts.model).resolve())
    from omniops.serving.tiny import write_tiny_checkpoint

    out = ROOT / "bench_out" / "proxy_llama512"
    if not (out / "config.json").exists():
        write_tiny_checkpoint(out, "llama", preset="bench", dtype="bfloat16", overrides={
            "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 64, "intermediate_size": 1536})
    return str(out)


class Proc:
    """A subprocess serving HTTP on a free loopback port, ready when ``ready_path`` answers 200."""

    def __init__(self, cmd: list[str], port: int, log: Path, ready_path: str = "/health"):
        self.port, self.url, self.log = port, f"http://{HOST}:{port}", log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT)
        self.ready_path = ready_path

    def wait(self, timeout: float = 300.0) -> Proc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log.name}: exited with {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-1500:]}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.log.name}: not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def engine(model: str, name: str, *args: str) -> Proc:
    port = free_port()
    return Proc([sys.executable, "-m", "omniops.serving.cli", model, "--host", HOST, "--port", str(port),
                 *ENGINE_ARGS, *args], port, LOG_DIR / f"proxy_{name}.log")


def omni_proxy(model: str, name: str, *args: str) -> Proc:
    port = free_port()
    return Proc([sys.executable, "-m", "omniops.serving.proxy.cli", "--host", HOST, "--port", str(port),
                 "--tokenizer", model, "--log-level", "warning", *args], port, LOG_DIR / f"proxy_{name}.log")


def vllm_router(policy: str, urls: list[str]) -> Proc:
    port = free_port()
    return Proc([str(ROUTER), "--worker-urls", *urls, "--policy", policy, "--host", HOST, "--port", str(port)],
                port, LOG_DIR / f"proxy_vllm_router_{policy}.log", ready_path="/health")


# ---- workloads ---------------------------------------------------------------------------------------------
def _text(tok, rng: random.Random, num_tokens: int) -> str:
    """Text of about num_tokens tokens of random vocabulary pieces (decoded ids, re-encoded to check)."""
    ids = [rng.randrange(16, tok.vocab_size) for _ in range(num_tokens)]
    text = tok.decode(ids, skip_special_tokens=True)
    for _ in range(6):  # decoding random ids and encoding again makes more tokens: cut and repeat until it fits
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) <= num_tokens:
            break
        text = tok.decode(ids[:num_tokens], skip_special_tokens=True)
    return text


def bursty(tok, n: int, shape_seed: int, text_seed: int) -> list[tuple[float, str, int]]:
    """Lengths and arrivals from shape_seed (the same for every router in a repetition), text from text_seed
    (fresh per run: nothing is served from an earlier run's prefix cache)."""
    rng, trng = random.Random(shape_seed), random.Random(text_seed)
    lens = [round(math.exp(rng.uniform(math.log(16), math.log(2048)))) for _ in range(n)]
    outs = [round(math.exp(rng.uniform(math.log(16), math.log(256)))) for _ in range(n)]
    return [((i // BURST) * BURST_GAP_S, _text(tok, trng, L), o) for i, (L, o) in enumerate(zip(lens, outs,
                                                                                               strict=True))]


def prefix_heavy(tok, n: int, shape_seed: int, text_seed: int) -> list[tuple[float, str, int]]:
    rng, trng = random.Random(shape_seed), random.Random(text_seed)
    prefixes = [_text(tok, trng, PREFIX_TOKENS) for _ in range(NUM_PREFIXES)]
    weights = [1 / (k + 1) for k in range(NUM_PREFIXES)]
    t, out = 0.0, []
    for _ in range(n):
        k = rng.choices(range(NUM_PREFIXES), weights)[0]
        out.append((t, prefixes[k] + _text(tok, trng, rng.randint(16, 64)), 32))
        t += rng.expovariate(PREFIX_RATE)
    return out


# ---- one run -----------------------------------------------------------------------------------------------
def _counters(urls: list[str]) -> dict[str, float]:
    tot = {"hits": 0.0, "queries": 0.0}
    for u in urls:
        with urllib.request.urlopen(u + "/metrics", timeout=5) as r:
            text = r.read().decode()
        for key, name in (("hits", "omni:prefix_cache_hits_total"), ("queries", "omni:prefix_cache_queries_total")):
            m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
            tot[key] += float(m[1]) if m else 0.0
    return tot


async def _drive(port: int, work: list[tuple[float, str, int]]):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:  # open loop: no cap
        t0 = time.perf_counter()

        async def one(at: float, prompt: str, max_tokens: int):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            return await stream_completion(HOST, port, completion_payload("bench", prompt, max_tokens),
                                           session=session)

        results = await asyncio.gather(*(one(*w) for w in work))
        return list(results), time.perf_counter() - t0


def measure(router: str, policy: str, workload: str, port: int, work, engine_urls: list[str]) -> dict:
    before = _counters(engine_urls)
    results, duration = asyncio.run(_drive(port, work))
    after = _counters(engine_urls)
    q = after["queries"] - before["queries"]
    return {"router": router, "policy": policy, "workload": workload, **summarize(results, duration),
            "prefix_hit_rate": (after["hits"] - before["hits"]) / q if q else float("nan"),
            "load_avg": os.getloadavg()[0]}


def averaged(rows: list[dict]) -> list[dict]:
    """One row per (router, policy, workload): the mean of its repetitions' metrics."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["router"], r["policy"], r["workload"]), []).append(r)
    out = []
    for rs in groups.values():
        avg = dict(rs[0])
        for k, v in rs[0].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                avg[k] = sum(r[k] for r in rs) / len(rs) if isinstance(v, float) else sum(r[k] for r in rs)
        avg["reps"] = len(rs)
        out.append(avg)
    return out


def _fmt(v, d: int = 0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def table(rows: list[dict], workload: str) -> Table:
    t = Table(title=f"omni-bench proxy: {workload}")
    for col in ("router", "policy", "done", "TTFT p50 ms", "TTFT p99 ms", "ITL p99 ms", "out tok/s",
                "prefix hit %", "errors"):
        t.add_column(col, justify="left" if col in ("router", "policy") else "right")
    for r in rows:
        if r["workload"] == workload:
            t.add_row(r["router"], r["policy"], f"{r['completed']}/{r['requests']}", _fmt(r["ttft_p50_ms"]),
                      _fmt(r["ttft_p99_ms"]), _fmt(r["itl_p99_ms"]), _fmt(r["output_tok_s"], 1),
                      _fmt(100 * r["prefix_hit_rate"], 1), str(r["errors"]))
    return t


def _run_routers(model, urls, workloads, targets, console, rows, run_id, reps: int) -> None:
    for wname, policies in (("bursty", OMNI_BURSTY), ("prefix-heavy", OMNI_PREFIX)):
        runs = [("omni-proxy", p) for p in policies if "omni" in targets]
        if "vllm" in targets and ROUTER.exists():
            runs += [("vllm-router", p) for p in VLLM_POLICIES]
        for (router, policy), rep in ((r, k) for k in range(reps) for r in runs):
            run_id[0] += 1
            work = workloads[wname](rep, run_id[0])
            srv = (omni_proxy(model, f"omni_{policy}", "--backend", *urls, "--policy", policy)
                   if router == "omni-proxy" else vllm_router(policy, urls)).wait()
            try:
                row = measure(router, policy, wname, srv.port, work, urls)
            finally:
                srv.stop()
            console.print(f"  {wname:12s} {router:11s} {policy:22s} TTFT p50 {row['ttft_p50_ms']:6.0f} p99 "
                          f"{row['ttft_p99_ms']:6.0f} ms, ITL p99 {row['itl_p99_ms']:5.0f} ms, "
                          f"{row['output_tok_s']:6.1f} tok/s, hit {100 * row['prefix_hit_rate']:4.1f}%, "
                          f"{row['errors']} errors")
            rows.append(row)


def run(opts: BenchOptions, console: Console) -> list[dict]:
    from transformers import AutoTokenizer

    model = _model(opts)
    targets = opts.targets or ["omni", "vllm", "pd"]
    if "vllm" in targets and not ROUTER.exists():
        console.print(f"[yellow]vllm: skipped[/] ({ROUTER} missing: `make peers`)")
    tok = AutoTokenizer.from_pretrained(model)
    n = opts.num_prompts or 48
    reps = opts.reps or 1
    workloads = {"bursty": lambda rep, i: bursty(tok, n, rep, 1000 + i),
                 "prefix-heavy": lambda rep, i: prefix_heavy(tok, n, rep, 1000 + i)}
    rows: list[dict] = []
    run_id = [0]
    if "omni" in targets or "vllm" in targets:
        engines = [engine(model, f"mixed{i}") for i in range(2)]
        try:
            for e in engines:
                e.wait()
            _run_routers(model, [e.url for e in engines], workloads, targets, console, rows, run_id, reps)
        finally:
            for e in engines:
                e.stop()
    if "pd" in targets:
        p = engine(model, "prefill", "--role", "prefill")
        d = engine(model, "decode", "--role", "decode")
        try:
            p.wait()
            d.wait()
            run_id[0] += 1
            srv = omni_proxy(model, "omni_pd", "--prefill", p.url, "--decode", d.url).wait()
            try:
                row = measure("omni-proxy 1P1D", "prefill_score/pd_score", "bursty", srv.port,
                              workloads["bursty"](0, run_id[0]), [p.url, d.url])
            finally:
                srv.stop()
            console.print(f"  bursty       1P1D        TTFT p50 {row['ttft_p50_ms']:6.0f} p99 {row['ttft_p99_ms']:6.0f}"
                          f" ms, ITL p99 {row['itl_p99_ms']:5.0f} ms, {row['output_tok_s']:6.1f} tok/s")
            rows.append(row)
        finally:
            p.stop()
            d.stop()
    for w in ("bursty", "prefix-heavy"):
        console.print(table(averaged(rows), w))
    return rows
