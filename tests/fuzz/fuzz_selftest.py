"""Synthetic cases that break the rules on purpose: the fuzz machinery must report every one of them.

Each is a (call, args, outputs, expect) for fuzz_harness.judge, or a process-level failure (a signal, an abort,
a hang) for fuzz_runner; test_fuzz_harness_selftest checks the verdicts.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from typing import Any

import fuzz_harness
import fuzz_tensors
import torch


def _oob_write(a: dict[str, Any]) -> None:
    out = a["out"]
    out.as_strided((out.numel() + 1,), (1,)).fill_(1.0)  # one element past the end


def _changes_input(a: dict[str, Any]) -> None:
    a["x"].add_(1.0)
    a["out"].copy_(a["x"])


def _stride_dependent(a: dict[str, Any]) -> None:
    a["out"].fill_(float(a["x"].stride(0)))  # a "kernel" that gets a strided input wrong


def _copy(a: dict[str, Any]) -> None:
    a["out"].copy_(a["x"])


def _runtime_error(a: dict[str, Any]) -> None:
    raise RuntimeError("an unchecked kernel failure")


def _judged(fn: Callable[[dict[str, Any]], Any], expect: str, strided: bool = False) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        fuzz_tensors.reset()
        x = fuzz_tensors.padded((4, 8))
        if strided:
            x = fuzz_tensors.place(torch.randn(4, 16)[:, :8])
        out = fuzz_tensors.padded((4, 8), fill="zeros")
        return fuzz_harness.judge(fn, {"out": out, "x": x}, ("out",), expect)

    return run


def _process(fn: Callable[[], None]) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        fn()
        return {"outcome": "passed"}

    return run


# case id -> (runs the case in the child, the verdict the machinery must reach: an outcome and a phrase of "why")
CASES: dict[str, tuple[Callable[[], dict[str, Any]], str, str]] = {
    "good": (_judged(_copy, "any"), "accepted", ""),
    "good_strided": (_judged(_copy, "any", strided=True), "accepted", ""),
    "oob_write": (_judged(_oob_write, "any"), "fail", "wrote outside a tensor"),
    "changes_input": (_judged(_changes_input, "any"), "fail", "changed input x"),
    "wrong_for_strides": (_judged(_stride_dependent, "any", strided=True), "fail", "differs from the same call"),
    "accepts_invalid": (_judged(_copy, "reject"), "fail", "accepted an invalid input"),
    "other_exception": (_judged(_runtime_error, "any"), "fail", "raised RuntimeError"),
    "segfault": (_process(lambda: ctypes.string_at(0)), "fail", "crash"),
    "after_segfault": (_judged(_copy, "any"), "accepted", ""),
    "abort": (_process(os.abort), "fail", "crash"),
    "hang": (_process(lambda: time.sleep(600)), "fail", "hang"),
    "after_hang": (_judged(_copy, "any"), "accepted", ""),
}
