"""Timing a set of implementations per shape and printing the table every op routine shares.

A routine builds ``Case``s: for one op and shape, the bytes the op must move (and flops), and labelled
callables. Labels ``eager`` and ``compile`` (torch eager / torch.compile of the reference) and ``vllm``
(vLLM-CPU) are the comparison columns; every other label is one of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omniops.bench.common import BenchOptions
from omniops.bench.timing import measure, memory_bandwidth
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

PEER_LABELS = ("eager", "compile", "vllm")


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    bytes: int
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)
    flops: float = 0.0
    device: str = "cpu"


def compiled(fn: Callable) -> Callable:
    """torch.compile of a reference function (Inductor, default mode); compiled lazily on first call."""
    return torch.compile(fn, dynamic=False)


def run_cases(title: str, cases: list[Case], opts: BenchOptions, console: Console) -> list[dict]:
    device = cases[0].device if cases else "cpu"
    peak = memory_bandwidth(device)["peak"]
    rows: list[dict] = []
    total = sum(len(c.impls) for c in cases)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(title, total=total)
        for c in cases:
            times: dict[str, float] = {}
            for label, fn in c.impls.items():
                progress.update(task, description=f"{c.op} {c.shape} {label}")
                try:
                    times[label] = measure(fn, device=c.device, reps=opts.reps).median_s
                except Exception as e:  # a peer that rejects a shape must not stop the run
                    console.print(f"[yellow]{c.op} {c.shape} {label}: {type(e).__name__}: {e}")
                progress.advance(task)
            for label, t in times.items():
                row = {
                    "op": c.op, "shape": c.shape, "dtype": c.dtype, "impl": label, "ms": t * 1e3,
                    "GB/s": c.bytes / t / 1e9, "%peak": 100 * c.bytes / t / 1e9 / peak,
                    "TFLOP/s": c.flops / t / 1e12 if c.flops else None,
                }
                for peer in PEER_LABELS:
                    row[f"x_{peer}"] = times[peer] / t if peer in times and label != peer else None
                rows.append(row)
    print_table(title, rows, peak, console)
    return rows


def run_routine(name: str, title: str, cases: list[Case], opts: BenchOptions, console: Console,
                plot_title: str | None = None) -> list[dict]:
    """A routine's whole run: time ``cases`` (``run_cases``), draw ``--plot`` to ``opts.plot_path(name)``."""
    rows = run_cases(title, cases, opts, console)
    path = opts.plot_path(name)
    if path:
        plot_rows(rows, path, plot_title or title)
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def print_table(title: str, rows: list[dict], peak: float, console: Console) -> None:
    table = Table(title=f"{title}  (memory bandwidth measured here: {peak:.1f} GB/s)")
    for col in ("op", "shape", "dtype", "impl", "median ms", "GB/s", "% bw", "TFLOP/s",
                "x eager", "x compile", "x vllm"):
        table.add_column(col, justify="left" if col in ("op", "shape", "dtype", "impl") else "right")
    for r in rows:
        ours = r["impl"] not in PEER_LABELS
        style = "bold" if ours else None
        table.add_row(
            r["op"], r["shape"], r["dtype"], r["impl"], _fmt(r["ms"], ".3f"), _fmt(r["GB/s"], ".1f"),
            _fmt(r["%peak"], ".0f"), _fmt(r["TFLOP/s"], ".3f"), _fmt(r["x_eager"], ".2f"),
            _fmt(r["x_compile"], ".2f"), _fmt(r["x_vllm"], ".2f"), style=style,
        )
    console.print(table)


def plot_rows(rows: list[dict], path: str, title: str) -> None:
    """Bar chart of achieved GB/s per shape and implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(f"{r['op']} {r['shape']} {r['dtype']}" for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.9), 5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        vals = [next((r["GB/s"] for r in rows if f"{r['op']} {r['shape']} {r['dtype']}" == k and r["impl"] == impl), 0)
                for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], vals, width, label=impl)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], keys, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("GB/s")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
