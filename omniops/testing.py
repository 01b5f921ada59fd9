"""Numerical tolerances, written down once, and helpers shared by the tests and the benchmarks.

Tolerances are per dtype for ops computed in fp32 and rounded once (or twice, as HF's RMSNorm) to the output
dtype: a backend may differ from the reference by the fp32 summation order, which can flip the final rounding
by one unit in the last place. bf16 has 8 significant bits (1 ulp = 2**-7 relative), fp16 11 bits.
"""

from __future__ import annotations

import torch

# dtype -> (atol, rtol)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, scale: float = 1.0, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the dtype's tolerance (times ``scale`` for ops with longer fp32
    reductions, e.g. attention over thousands of keys). Compares in fp32; NaNs must match."""
    atol, rtol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale, equal_nan=True,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )
