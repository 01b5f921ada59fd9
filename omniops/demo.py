"""The quick-start demo (``make demo``): a small DeepSeek-V3-layout model (transformers config, random weights,
nothing downloaded) compiled with ``torch.compile(model, backend="omni")``; generates a few greedy tokens,
prints the omni pass report and the decode speed-up over eager and over torch.compile (Inductor), timed
interleaved (step by step across the implementations, so load on a shared machine hits all alike).

    python -m omniops.demo [--hidden 512] [--layers 2] [--experts 32] [--tokens 8]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _tokens(fn, model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens through ``fn`` (batch and sequence / cache lengths marked dynamic)."""
    from omniops.graph_passes import models as M

    return M.greedy(fn, model, ids.clone(), steps)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omniops.demo", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens to generate (>= 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (on a shared, oversubscribed machine 1 is faster and steadier)")
    args = p.parse_args(argv)
    if args.threads is None and hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        args.threads = 1
        print(f"load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores: timing with 1 thread "
              "(multi-threaded regions stall on an oversubscribed machine; --threads to override)")
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = max(args.tokens, 4)

    import omniops
    from omniops.bench.model import time_models
    from omniops.graph_passes import models as M
    from omniops.graph_passes import prepare, report, reset_report

    cfg = M.deepseek_v3_config(hidden=args.hidden, layers=args.layers, experts=args.experts, top_k=4, groups=4,
                               topk_groups=2, dense_layers=1, vocab=2048, heads=8)
    print(f"omniops {omniops.__version__}, torch {torch.__version__}: DeepSeek-V3 layout, hidden {args.hidden}, "
          f"{args.layers} layers ({cfg.first_k_dense_replace} dense), {args.experts} routed experts top-"
          f"{cfg.num_experts_per_tok}, random weights")
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    # one model instance per implementation (same weights), so each compiled one has its own Dynamo cache
    eager = M.build(cfg)
    ind, omni = M.build(cfg), M.build(cfg)
    impls = {"eager": (eager, eager), "inductor": (torch.compile(ind), ind),
             "omni": (torch.compile(omni, backend="omni"), omni)}
    prep = M.build(cfg)
    prepare(prep)
    impls["omni+prepare"] = (torch.compile(prep, backend="omni"), prep)
    reset_report()
    eager_toks = _tokens(eager, eager, ids, steps)
    omni_toks = _tokens(impls["omni"][0], omni, ids, steps)
    print(f"greedy tokens (first sequence): {omni_toks[0].tolist()} "
          f"{'== eager' if torch.equal(omni_toks, eager_toks) else '!= eager'}")
    print(report().format())
    print(f"timing decode steps (batch 4, context 64), interleaved across {', '.join(impls)} ...")
    with torch._dynamo.config.patch(recompile_limit=64):
        times = time_models(impls, cfg.vocab_size, reps=2)
    for name, t in times.items():
        print(f"  {name:13s} {1e3 * t['decode_s']:8.2f} ms / decode step   {1e3 * t['prefill_s']:8.1f} ms prefill")
    for name in [n for n in times if n.startswith("omni")]:
        d = times[name]["decode_s"]
        print(f"{name} speed-up at decode: {times['eager']['decode_s'] / d:.2f}x over eager, "
              f"{times['inductor']['decode_s'] / d:.2f}x over inductor")
    print("with prepare(model) too, " + report().format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
