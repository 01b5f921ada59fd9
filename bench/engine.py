"""omni-bench engine: offline generation, omniops.serving.LLM vs Hugging Face generate vs vLLM-CPU's LLM (issue 11).

    omni-bench engine --model DIR [--targets omni,hf,vllm] [--num-prompts N] [--json F]

The same ~100-word prompts for every target; bf16, greedy, 64 new tokens with EOS ignored, max_model_len 1024.
HF generates the whole batch at once (left padding). Each target runs in a process of its own
(``_engine_worker.py``; vLLM's inside ``.venv-peers``), one after another, so that its peak RSS is its own.
Reported: output tokens/s of the 64-token run, prefill tokens/s of a max_tokens=1 run on other prompts of the
same length (so neither run is served from the other's prefix cache), load time and peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omniops.bench.common import BenchOptions
from omniops.bench.loadgen import make_prompts
from omniops.bench.servers import PEERS_PY, ROOT, target_env, unavailable
from rich.console import Console
from rich.table import Table

NAME = "engine"
OUTPUT_TOKENS = 64
PROMPT_WORDS = 100
DEFAULT_PROMPTS = 16
TARGETS = ("omni", "hf", "vllm")
WORKER = Path(__file__).with_name("_engine_worker.py")
LOG_DIR = ROOT / "bench_out" / "logs"


def _why_not(target: str) -> str | None:
    if target == "hf":
        return None
    if target == "omni":
        try:
            import omniops.serving  # noqa: F401
        except ImportError as e:
            return f"omniops.serving not importable: {e}"
        return None
    return unavailable(target)


def run_worker(target: str, job: dict, log: Path, timeout: float = 1800.0, threads: int | None = None) -> dict:
    """Run one measurement in a subprocess; its output goes to ``log``, its result (last JSON line) returned."""
    env = target_env(target, threads)
    if target == "vllm":
        py = str(PEERS_PY)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        py = sys.executable
    log.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([py, str(WORKER)], input=json.dumps(job), capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=timeout)
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).splitlines()[-15:])
        raise RuntimeError(f"{target} worker exited with {p.returncode}:\n{tail}")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{target} worker printed no result (log {log})")


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("target", "prompts", "prompt tok", "prefill tok/s", "output tok/s", "x vLLM out", "x HF out",
                "load s", "peak RSS MiB", "CPU util", "load avg"):
        t.add_column(col, justify="left" if col == "target" else "right")
    by = {r["backend"]: r for r in rows}
    nan = float("nan")

    def ratio(r: dict, peer: str) -> str:
        p = by.get(peer)
        return f"{r['output_tok_s'] / p['output_tok_s']:.2f}x" if p and p is not r else "-"

    for r in rows:
        t.add_row(r["backend"], str(r["num_prompts"]), str(r["prompt_tokens"]), f"{r['prefill_tok_s']:.0f}",
                  f"{r['output_tok_s']:.1f}", ratio(r, "vllm"), ratio(r, "hf"), f"{r['load_s']:.1f}",
                  f"{r['peak_rss_mib']:.0f}", f"{r.get('cpu_util', nan):.2f}", f"{r.get('load_avg', nan):.1f}")
    return t


def run(opts: BenchOptions, console: Console) -> list[dict]:
    if not opts.model:
        raise SystemExit("omni-bench engine: --model DIR is required (e.g. python -m omniops.serving.tiny DIR "
                         "--arch qwen3_moe --preset bench --dtype bfloat16)")
    model = str(Path(opts.model).resolve())
    n = opts.num_prompts or DEFAULT_PROMPTS
    job = {"model": model, "max_tokens": OUTPUT_TOKENS, "max_model_len": 1024,
           "warm": make_prompts(2, PROMPT_WORDS, seed=2000),
           "prefill": make_prompts(n, PROMPT_WORDS, seed=2001),
           "generate": make_prompts(n, PROMPT_WORDS, seed=2002)}
    rows = []
    for target in opts.targets or list(TARGETS):
        why = _why_not(target)
        if why:
            console.print(f"[yellow]{target}: skipped[/] ({why})")
            continue
        log = LOG_DIR / f"engine_{target}_{Path(model).name}.log"
        console.print(f"[bold]{target}[/]: measuring (log {log.relative_to(ROOT)})")
        try:
            r = run_worker(target, {**job, "backend": target}, log, threads=opts.threads)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            console.print(f"[red]{target}: failed[/] {e}")
            continue
        console.print(f"  prefill {r['prefill_tok_s']:.0f} tok/s, output {r['output_tok_s']:.1f} tok/s, "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB")
        rows.append({**r, "model": model, "load_avg": os.getloadavg()[0], "threads_opt": opts.threads})
    title = (f"engine: {Path(model).name}, {n} prompts of ~{PROMPT_WORDS} words, {OUTPUT_TOKENS} new tokens, "
             f"bf16 greedy, threads {opts.threads or 'default'}")
    console.print(table(rows, title))
    return rows
