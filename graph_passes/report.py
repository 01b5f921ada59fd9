"""What the omni passes did: matches per pattern, and expected rewrites that did not happen (with why)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class PassReport:
    graphs: int = 0  # graphs our passes ran on (Inductor compiles one per Dynamo graph; a cache hit skips it)
    matched: Counter = field(default_factory=Counter)  # pattern name -> rewrites
    missed: dict[str, str] = field(default_factory=dict)  # pattern name -> why it was expected and did not match
    notes: list[str] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)  # omni op -> calls in the rewritten graphs

    def add(self, name: str, count: int = 1) -> None:
        self.matched[name] += count

    def miss(self, name: str, why: str) -> None:
        self.missed.setdefault(name, why)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def merge(self, other: PassReport) -> None:
        self.graphs += other.graphs
        self.matched.update(other.matched)
        self.ops.update(other.ops)
        for k, v in other.missed.items():
            self.missed.setdefault(k, v)
        for n in other.notes:
            self.note(n)

    def clear(self) -> None:
        self.graphs = 0
        self.matched.clear()
        self.ops.clear()
        self.missed.clear()
        self.notes.clear()

    def format(self) -> str:
        lines = [f"omni passes: {self.graphs} graph(s) rewritten"]
        if self.matched:
            lines.append("  matched: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.matched.items())))
        else:
            lines.append("  matched: nothing")
        if self.ops:
            lines.append("  omni ops in the graphs: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.ops.items())))
        for k, why in sorted(self.missed.items()):
            if k not in self.matched:
                lines.append(f"  not matched: {k}: {why}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


_REPORT = PassReport()


def report() -> PassReport:
    """The report accumulated over every omni compile since the last ``reset_report()``."""
    return _REPORT


def reset_report() -> None:
    _REPORT.clear()
