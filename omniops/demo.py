"""The quick-start demo (``make demo``): a small DeepSeek-V3-layout model (transformers config, random weights,
nothing downloaded) compiled with ``torch.compile(model, backend="omni")``; generates a few greedy tokens,
prints the omni pass report and the decode speed-up over eager and over torch.compile (Inductor).

    python -m omniops.demo [--hidden 512] [--layers 2] [--experts 32] [--tokens 8]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _decode_ms(fn, model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens and the median decode-step time (ms) through ``fn``."""
    from transformers import DynamicCache

    from omniops.graph_passes import models as M

    cache = DynamicCache(config=model.config)
    times, toks = [], []
    with torch.no_grad():
        M.mark_dynamic_inputs(ids)
        out = fn(input_ids=ids, cache=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps):
            toks.append(tok)
            M.mark_dynamic_inputs(tok, cache)
            t0 = time.perf_counter()
            out = fn(input_ids=tok, cache=cache, use_cache=True)
            if i >= 2:  # the first steps compile
                times.append(time.perf_counter() - t0)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
    times.sort()
    return torch.cat(toks, 1), 1e3 * times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omniops.demo", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens to generate (>= 4)")
    args = p.parse_args(argv)
    steps = max(args.tokens, 4)

    import omniops
    from omniops.graph_passes import models as M
    from omniops.graph_passes import prepare, report, reset_report

    torch.set_num_threads(torch.get_num_threads())
    cfg = M.deepseek_v3_config(hidden=args.hidden, layers=args.layers, experts=args.experts, top_k=4, groups=4,
                               topk_groups=2, dense_layers=1, vocab=2048, heads=8)
    print(f"omniops {omniops.__version__}, torch {torch.__version__}: DeepSeek-V3 layout, hidden {args.hidden}, "
          f"{args.layers} layers ({cfg.first_k_dense_replace} dense), {args.experts} routed experts top-"
          f"{cfg.num_experts_per_tok}, random weights")
    model = M.build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))

    eager_toks, eager_ms = _decode_ms(model, model, ids.clone(), steps)
    print(f"eager:             {eager_ms:7.2f} ms / decode step")
    torch._dynamo.reset()
    ind_toks, ind_ms = _decode_ms(torch.compile(model), model, ids.clone(), steps)
    print(f"inductor:          {ind_ms:7.2f} ms / decode step")
    torch._dynamo.reset()
    reset_report()
    omni_toks, omni_ms = _decode_ms(torch.compile(model, backend="omni"), model, ids.clone(), steps)
    print(f"backend=\"omni\":    {omni_ms:7.2f} ms / decode step")
    print(report().format())
    print(f"tokens (first sequence): {omni_toks[0].tolist()}  "
          f"{'== eager' if torch.equal(omni_toks, eager_toks) else '!= eager (see the report)'}")
    print(f"omni speed-up at decode: {eager_ms / omni_ms:.2f}x over eager, {ind_ms / omni_ms:.2f}x over inductor")

    if hasattr(omniops, "fused_moe") and hasattr(omniops, "moe_route"):
        torch._dynamo.reset()
        reset_report()
        prepare(model)
        prep_toks, prep_ms = _decode_ms(torch.compile(model, backend="omni"), model, ids.clone(), steps)
        print(f"prepare(model) + backend=\"omni\": {prep_ms:7.2f} ms / decode step: "
              f"{eager_ms / prep_ms:.2f}x over eager, {ind_ms / prep_ms:.2f}x over inductor")
        print(report().format())
    else:
        print("omniops.fused_moe / moe_route are not merged yet: the MoE blocks stay HF's grouped_mm experts, "
              "so no MoE speed-up is possible here yet (norm rewrites only).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
