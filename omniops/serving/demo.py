"""The quick-start demo (``make demo``): serve a small random DeepSeek-V3-shaped model with omni-serve and show it.

1. writes the checkpoint once (MLA with DeepSeek's real 512 + 64 latent dims, 32 experts top-4 + 1 shared,
   random weights, a byte-level BPE tokenizer; nothing downloaded) into ``bench_out/demo-deepseek_v3``;
2. starts ``omni-serve`` on a free loopback port and streams a few completions through the OpenAI client,
   printing the text as it arrives (random weights: the words are noise, the speed is real);
3. runs a short load (16 streaming requests, 8 at a time, 64 tokens each) and prints tokens/s and latencies;
4. times Hugging Face ``generate`` on the same checkpoint and batch, for scale; then stops the server.

    python -m omniops.serving.demo [--model DIR] [--requests 16] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def hf_tokens_per_s(model_dir: str, prompts: list[str], max_new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    batch = tok(prompts, return_tensors="pt", padding=True)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    return (out.shape[1] - batch.input_ids.shape[1]) * len(prompts) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omniops.serving.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "bench_out" / "demo-deepseek_v3"))
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args(argv)

    from openai import OpenAI
    from rich.console import Console

    from omniops.bench.loadgen import make_prompts, run_load, summarize
    from omniops.bench.servers import HOST, Server
    from omniops.serving.tiny import write_tiny_checkpoint

    console = Console()
    model = Path(args.model)
    if not (model / "config.json").exists():
        console.print(f"writing a random DeepSeek-V3-shaped checkpoint to {model} ...")
        write_tiny_checkpoint(model, "deepseek_v3", preset="bench", dtype="bfloat16")
    log = ROOT / "bench_out" / "logs" / "demo_omni-serve.log"
    console.print(f"starting omni-serve on {HOST} (log {log}) ...")
    with Server("omni", str(model), log) as srv:
        console.print(f"[bold]omni-serve[/] ready after {srv.startup_s:.0f} s on http://{HOST}:{srv.port}/v1")
        client = OpenAI(base_url=f"http://{HOST}:{srv.port}/v1", api_key="unused", timeout=120)
        for seed, prompt in enumerate(("The capital of France is", "Write a haiku about experts:")):
            console.print(f"\n[bold]> {prompt}[/]")
            t0, first, n = time.perf_counter(), None, 0
            for chunk in client.completions.create(model=srv.model_id, prompt=prompt, max_tokens=32,
                                                   temperature=0.7, seed=seed, stream=True):
                first = first or time.perf_counter()
                n += 1
                sys.stdout.write(chunk.choices[0].text)
                sys.stdout.flush()
            dt = time.perf_counter() - t0
            console.print(f"\n[dim]{n} chunks, first after {(first - t0) * 1e3:.0f} ms, {dt:.2f} s in all[/]")
        prompts = make_prompts(args.requests, 100, seed=7)
        results, duration = asyncio.run(run_load(HOST, srv.port, srv.model_id, prompts, args.tokens,
                                                 args.concurrency))
        s = summarize(results, duration)
    console.print(f"\n[bold]load[/]: {args.requests} requests x {args.tokens} tokens, {args.concurrency} at a time: "
                  f"[green]{s['output_tok_s']:.0f} output tok/s[/], TTFT p50 {s['ttft_p50_ms']:.0f} ms, "
                  f"inter-token p50 {s['itl_p50_ms']:.1f} ms, {s['errors']} errors")
    console.print("Hugging Face generate on the same checkpoint and batch size (for scale) ...")
    hf = hf_tokens_per_s(str(model), prompts[:args.concurrency], args.tokens)
    console.print(f"[bold]HF generate[/]: {hf:.0f} output tok/s at batch {args.concurrency} "
                  f"-> omni-serve is {s['output_tok_s'] / hf:.1f}x")
    return 0 if not s["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
