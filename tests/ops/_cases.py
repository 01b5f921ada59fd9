"""Which (backend, device, dtype, ISA) combinations the op tests run on this machine, with reasons for skips.

Every op test is parametrized over ``BACKEND_CASES``: the reference, the C++ ``cpu`` backend on every ISA level
this CPU can run (the AVX2 path is forced on AVX-512 machines too), and Triton (on the GPU when there is one,
else through the interpreter for fp32/fp16).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

import omniops
from omniops import _backends, _cpu, _ext


@dataclass(frozen=True)
class Case:
    backend: str
    device: str
    isa: str | None = None

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.isa}" if self.isa else f"{self.backend}-{self.device}"

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.isa is not None:
                stack.enter_context(_cpu.force_isa(self.isa))
            stack.enter_context(omniops.use_backend(self.backend))
            yield


def _cases() -> list:
    out = [pytest.param(Case("reference", "cpu"), id="reference")]
    if _ext.cpp() is None:
        out.append(pytest.param(Case("cpu", "cpu"), id="cpu",
                                marks=pytest.mark.skip(reason=f"omniops._C not built: {_ext.unavailable_reason()}")))
    else:
        for isa in _cpu.available_isas():
            out.append(pytest.param(Case("cpu", "cpu", isa), id=f"cpu-{isa}"))
    if _backends.triton_import_error():
        out.append(pytest.param(Case("triton", "cpu"), id="triton",
                                marks=pytest.mark.skip(reason=_backends.triton_import_error())))
    elif torch.cuda.is_available():
        out.append(pytest.param(Case("triton", "cuda"), id="triton-cuda"))
    else:
        out.append(pytest.param(Case("triton", "cpu"), id="triton-interpret"))
    return out


BACKEND_CASES = _cases()
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def skip_unsupported(case: Case, dtype: torch.dtype, *, uses_dot: bool = False) -> None:
    """Skip what this machine cannot check faithfully, saying why."""
    if case.backend == "triton" and case.device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 Triton runs only on a GPU: the interpreter rounds bf16 differently"
                    + (" and tl.dot on bf16 is wrong there" if uses_dot else ""))


def strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` in another layout: 'contiguous', 'rows' (row-strided view into a wider
    buffer), or 'transposed' (a non-contiguous copy whose last dim is not unit-stride)."""
    if kind == "contiguous":
        return t
    if kind == "rows":
        buf = torch.full((*t.shape[:-1], t.shape[-1] + 7), float("nan"), dtype=t.dtype, device=t.device)
        buf[..., : t.shape[-1]] = t
        return buf[..., : t.shape[-1]]
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    raise ValueError(kind)


LAYOUTS = ["contiguous", "rows", "transposed"]
