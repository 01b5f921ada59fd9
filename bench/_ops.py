"""Shared plumbing of the elementwise/row-wise op routines (norm, activation, rotary)."""

from __future__ import annotations

import torch
from omniops.bench.common import BenchOptions

import omniops
from omniops import _backends

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tokens_preset(opts: BenchOptions) -> list[int]:
    return [1, 16, 512, 4096] if opts.shapes == "quick" else [1, 4, 16, 64, 256, 512, 1024, 2048, 4096]


def our_backends(opts: BenchOptions, device: str = "cpu") -> list[str]:
    """Our backends to time: the requested ones, else those that can run here (not the reference)."""
    if opts.backends:
        return opts.backends
    dev = torch.device(device)
    return [b for b in ("cpu", "triton") if _backends._generic_reason(b, dev, torch.float32) is None]


def with_backend(backend: str, fn):
    def run():
        with omniops.use_backend(backend):
            return fn()

    return run
