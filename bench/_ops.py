"""Shared plumbing of the op routines: dtypes by name, which of our backends to time, running on one."""

from __future__ import annotations

from collections.abc import Callable

import torch
from omniops.bench.common import BenchOptions

import omniops

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtypes(opts: BenchOptions) -> list[tuple[str, torch.dtype]]:
    """The requested dtypes as (name, torch dtype)."""
    return [(name, DTYPES[name]) for name in opts.dtypes]


def tokens_preset(opts: BenchOptions) -> list[int]:
    return [1, 16, 512, 4096] if opts.shapes == "quick" else [1, 4, 16, 64, 256, 512, 1024, 2048, 4096]


def our_backends(opts: BenchOptions, device: str = "cpu") -> list[str]:
    """Our backends to time: the requested ones, else those that can run here (not the reference)."""
    if opts.backends:
        return opts.backends
    return [b for b in omniops.available_backends(device) if b != "reference"]


def with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run under ``omniops.use_backend(backend)``."""
    def run():
        with omniops.use_backend(backend):
            return fn()

    return run
