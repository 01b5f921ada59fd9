"""What every omni-bench routine receives. A routine is a module ``omniops.bench.<name>`` with

    NAME: str                                   # the CLI word: ``omni-bench <NAME>``
    def run(opts: BenchOptions, console: rich.console.Console) -> list[dict]: ...

It prints its own table (rich) and returns one dict per row; the CLI writes them to ``--json``. A routine
that draws ``--plot`` writes ``opts.plot_path(NAME)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BenchOptions:
    shapes: str = "quick"  # "quick" | "full"
    backends: list[str] = field(default_factory=list)  # empty = every backend available here
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    plot: str | None = None  # PNG path (``all``: one file per routine, name suffixed)
    json: str | None = None
    reps: int | None = None  # override the timer's repetitions
    several: bool = False  # True when running ``all`` (plot paths get the routine name)
    # the serving routines (serve, engine): a checkpoint directory, what to compare, the load
    model: str | None = None
    targets: list[str] = field(default_factory=list)  # empty = every target the routine knows
    concurrency: list[int] = field(default_factory=list)  # empty = the routine's default
    num_prompts: int | None = None
    threads: int | None = None  # compute threads of every target (None: each one's default)

    def plot_path(self, routine: str) -> str | None:
        if self.plot is None:
            return None
        if not self.several:
            return self.plot
        p = Path(self.plot)
        return str(p.with_name(f"{p.stem}_{routine}{p.suffix or '.png'}"))
