"""Runs one fuzz case in this process and judges it.

A case passes when the call either raises ValueError / TypeError (required when the case's ``expect`` is
"reject"), or is accepted and then: wrote nothing outside its tensors (sentinel padding intact), left every input
that is not an output unchanged, and gave the same outputs as the same call on contiguous copies of the inputs
(which catches silently wrong answers from aliasing or odd strides). Anything else - another exception type, a
changed input, a mismatch - fails; a crash or a hang is caught by the parent (fuzz_runner).
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from typing import Any

import fuzz_tensors
import torch

from omniops.testing import TOLERANCES

MAX_CLONE = 1 << 22  # elements; larger (stride-0 broadcast) tensors are not copied for the comparison
ANONYMOUS = "incompatible function arguments"
OOM = re.compile(r"can't allocate memory|not enough memory|out of memory")


def _tensors(v: Any) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _tensors(x)]
    return []


def _snapshot(t: Any) -> Any:
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_neg() or t.numel() > MAX_CLONE:
        return None
    return t.clone(memory_format=torch.contiguous_format)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal (NaNs included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device.type == b.device.type == "cpu" and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def names_argument(msg: str, names: list[str]) -> bool:
    """The message names one of the call's arguments (and is not pybind's anonymous conversion error)."""
    if ANONYMOUS in msg:
        return False
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", msg) for n in names)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within the dtype's tolerance (omniops.testing), NaNs matching: for results that may come from
    different backends (the public ops fall back to the reference where the kernels cannot serve)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.dtype.is_floating_point or a.dtype not in TOLERANCES:
        return _same(a, b)
    atol, rtol = TOLERANCES[a.dtype]
    return torch.allclose(a.float(), b.float(), atol=4 * atol, rtol=4 * rtol, equal_nan=True)


def judge(call: Callable[[dict[str, Any]], Any], args: dict[str, Any], outputs: tuple[str, ...],
          expect: str, same: Callable[[torch.Tensor, torch.Tensor], bool] = _same) -> dict[str, Any]:
    """Run ``call(args)`` and judge it (see the module docstring). Returns a JSON-able record."""
    snap = {k: _snapshot(v) for k, v in args.items()}
    try:
        ret = call(args)
    except (ValueError, TypeError) as e:
        rec: dict[str, Any] = {"outcome": "rejected", "type": type(e).__name__, "msg": str(e)[:400]}
        pads = fuzz_tensors.pads_intact()
        if pads:
            rec.update(outcome="fail", why=f"rejected, but wrote outside a tensor first: {pads}")
        return rec
    except Exception as e:  # noqa: BLE001 - every other exception type is a finding
        if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and OOM.search(str(e))):
            # A size whose bytes fit in int64 but not in memory: the allocator's error, not a missing check.
            return {"outcome": "resource", "msg": str(e)[:200]}
        return {"outcome": "fail", "why": f"raised {type(e).__name__}: {str(e)[:300]}",
                "tb": traceback.format_exc()[-800:]}
    pads = fuzz_tensors.pads_intact()
    if pads:
        return {"outcome": "fail", "why": f"wrote outside a tensor: {pads}"}
    if expect == "reject":
        return {"outcome": "fail", "why": "accepted an invalid input"}
    out_tensors = [args[o] for o in outputs if isinstance(args.get(o), torch.Tensor)]
    for k, v in args.items():
        if k in outputs or not isinstance(v, torch.Tensor) or snap[k] is None:
            continue
        if any(_shares(v, o) for o in out_tensors):
            continue  # an input the call was allowed to write (an in-place pair)
        if not _same(v, snap[k]):
            return {"outcome": "fail", "why": f"accepted, but changed input {k}"}
    if any(isinstance(v, torch.Tensor) and snap[k] is None for k, v in args.items()):
        return {"outcome": "accepted_unverified"}
    fresh = {k: (s.clone() if s is not None else v) for (k, v), s in zip(args.items(), snap.values(), strict=True)}
    try:
        ret2 = call(fresh)
    except Exception as e:  # noqa: BLE001
        return {"outcome": "fail", "why": f"accepted, but the same call on contiguous copies raised "
                                          f"{type(e).__name__}: {str(e)[:200]}"}
    got = [args[o] for o in outputs] + _tensors(ret)
    want = [fresh[o] for o in outputs] + _tensors(ret2)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if isinstance(g, torch.Tensor) and not same(g, w):
            what = outputs[i] if i < len(outputs) else f"returned tensor {i - len(outputs)}"
            return {"outcome": "fail", "why": f"accepted, but {what} differs from the same call on contiguous copies"}
    return {"outcome": "accepted"}
