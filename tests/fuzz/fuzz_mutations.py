"""Bad (and borderline) inputs generated from a valid baseline call.

Every mutation changes one thing: an argument's Python type, a tensor's dtype / rank / sizes / strides / device,
an index value out of range, a scalar to NaN / inf / a value finite only as a double / an int past int64, or an
output aliased with another argument. ``expect`` is "reject" where the input is invalid whatever the op (a
ValueError / TypeError is required) and "any" where it may be valid (then the result must equal the same call on
contiguous copies, the inputs must be unchanged and nothing may be written outside the tensors).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from fuzz_specs_cpp import Call

HUGE = 2**62


@dataclasses.dataclass(frozen=True)
class Case:
    id: str  # "<baseline>:<argument>:<mutation>"
    base: str
    arg: str
    mutate: Callable[[Call], None]
    expect: str  # "reject" | "any"


def _set(name: str, value: Any) -> Callable[[Call], None]:
    def f(c: Call) -> None:
        c.args[name] = value

    return f


def _apply(name: str, fn: Callable[[torch.Tensor], Any]) -> Callable[[Call], None]:
    def f(c: Call) -> None:
        c.args[name] = fn(c.args[name])

    return f


def _with_value(value: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[0] = value
        return t

    return f


def _grow(d: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(t: torch.Tensor) -> torch.Tensor:
        extra = t.narrow(d, 0, 1) if t.shape[d] else torch.zeros((*t.shape[:d], 1, *t.shape[d + 1:]), dtype=t.dtype)
        return torch.cat([t, extra], d)

    return f


def _huge(t: torch.Tensor, d: int) -> int:
    """A size for dim d that makes t claim ~2**62 elements (torch refuses numels past int64)."""
    rest = math.prod(n for i, n in enumerate(t.shape) if i != d % t.dim())
    return max(2, HUGE // max(rest, 1))


def _rows_strided(t: torch.Tensor) -> torch.Tensor:
    buf = torch.zeros((*t.shape[:-1], t.shape[-1] + 3), dtype=t.dtype)
    buf[..., : t.shape[-1]] = t
    return buf[..., : t.shape[-1]]


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _retype(t: torch.Tensor, d: torch.dtype) -> torch.Tensor:
    return t != 0 if d == torch.bool else t.to(d)


def _other_dtypes(t: torch.Tensor) -> list[torch.dtype]:
    if t.dtype.is_floating_point:
        other = torch.float16 if t.dtype == torch.float32 else torch.float32
        return [torch.float64, torch.int32, other]
    if t.dtype == torch.bool:
        return [torch.float32, torch.int32]
    return [torch.int64 if t.dtype != torch.int64 else torch.int32, torch.float32]


def _tensor_cases(c: Call, a: str, t: torch.Tensor) -> list[tuple[str, Callable[[Call], None], str]]:
    is_out = a in c.outputs
    out: list[tuple[str, Callable[[Call], None], str]] = [
        ("None", _set(a, None), "any" if a in c.optional else "reject"),
        ("list", _set(a, [1.0, 2.0]), "reject"),
        ("int", _set(a, 3), "reject"),
        ("meta", _apply(a, lambda x: x.to("meta")), "any" if c.public else "reject"),
        ("rank+1", _apply(a, lambda x: x.unsqueeze(0)), "any"),
        ("rank-1", _apply(a, lambda x: x.reshape(-1) if x.dim() > 1 else x.reshape(-1)[:1].reshape(())), "any"),
    ]
    out += [(f"dtype={str(d).removeprefix('torch.')}", _apply(a, lambda x, d=d: _retype(x, d)), "any")
            for d in _other_dtypes(t)]
    if t.dtype.is_floating_point and t.dtype != torch.float8_e4m3fn:
        # _C reads raw memory and must refuse a lazy sign bit; for the public ops it is a valid (if odd) tensor
        out.append(("neg_view", _apply(a, torch._neg_view), "any" if c.public else "reject"))
    for d in range(t.dim()):
        out.append((f"size[{d}]+1", _apply(a, _grow(d)), "any"))
        out.append((f"size[{d}]=0", _apply(a, lambda x, d=d: x.narrow(d, 0, 0)), "any"))
    if t.dim() >= 1 and t.shape[-1] > 1:
        out.append(("rows_strided", _apply(a, _rows_strided), "any"))
    if t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1:
        out.append(("transposed", _apply(a, _transposed), "any"))
    if t.dim() >= 1 and t.shape[0] > 1:
        # A stride-0 view: fine to read, but a written tensor needs distinct memory per element.
        out.append(("expand0", _apply(a, lambda x: x[:1].expand(x.shape)), "reject" if is_out else "any"))
    if t.dim() >= 1:
        out.append(("huge0", _apply(a, lambda x: x[:1].expand(_huge(x, 0), *x.shape[1:])),
                    "reject" if is_out else "any"))
        out.append(("huge_last", _apply(a, lambda x: x[..., :1].expand(*x.shape[:-1], _huge(x, -1))),
                    "reject" if is_out else "any"))
    if a in c.ranges:
        lo, hi = c.ranges[a]
        info = torch.iinfo(t.dtype) if not t.dtype.is_floating_point and t.dtype != torch.bool else None
        bad = [lo - 1, hi] + ([info.max, info.min] if info is not None else [])
        for v in dict.fromkeys(bad):
            if info is not None and info.min <= v <= info.max and not lo <= v < hi:
                out.append((f"value={v}", _apply(a, _with_value(v)), "reject"))
    return out


def _alias_cases(c: Call, o: str, tensors: dict[str, torch.Tensor]) -> list[tuple[str, Callable[[Call], None], str]]:
    """Output o sharing memory with another argument: the identical tensor, or a view at the same or a shifted
    start."""
    out: list[tuple[str, Callable[[Call], None], str]] = []
    ot = tensors[o]
    for i, it in tensors.items():
        if i == o or ot.numel() == 0 or it.element_size() != ot.element_size() or not it.is_contiguous():
            continue
        if it.shape == ot.shape and it.dtype == ot.dtype:
            ok = (o, i) in c.inplace
            out.append((f"alias={i}", lambda c, o=o, i=i: c.args.__setitem__(o, c.args[i]), "any" if ok else "reject"))
        elif it.numel() >= ot.numel():
            out.append((f"view_of={i}", lambda c, o=o, i=i: c.args.__setitem__(
                o, c.args[i].reshape(-1).view(c.args[o].dtype)[: c.args[o].numel()].view(c.args[o].shape)), "reject"))
        if it.numel() > ot.numel():
            out.append((f"shifted_into={i}", lambda c, o=o, i=i: c.args.__setitem__(
                o, c.args[i].reshape(-1).view(c.args[o].dtype)[1: c.args[o].numel() + 1].view(c.args[o].shape)),
                "reject"))
    return out


INT_BAD = (("None", None), ("float", 1.5), ("bool", True), ("past_int64", 2**63), ("below_int64", -2**63 - 1),
           ("str", "3"), ("list", [1]))
INT_ODD = (("-1", -1), ("0", 0), ("2**31", 2**31), ("2**62", 2**62), ("int64_max", 2**63 - 1), ("int64_min", -2**63))
FLOAT_BAD = (("None", None), ("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf")),
             ("1e39", 1e39), ("bool", True), ("str", "1.0"), ("huge_int", 10**400))
FLOAT_ODD = (("-1", -1.0), ("0", 0.0), ("1e30", 1e30), ("int", 2))
BOOL_BAD = (("None", None), ("int2", 2), ("int1", 1), ("int0", 0), ("str", "True"))
STR_BAD = (("None", None), ("int", 3), ("bytes", b"silu"))


def mutations(base: str, c: Call) -> list[Case]:
    """Every mutation of baseline ``base`` (an instance ``c`` of it, used only to see the arguments' kinds)."""
    cases: list[tuple[str, str, Callable[[Call], None], str]] = []
    tensors = {k: v for k, v in c.args.items() if isinstance(v, torch.Tensor)}
    for a, v in c.args.items():
        if v is None or isinstance(v, torch.Tensor):
            if v is not None:
                cases += [(a, m, f, e) for m, f, e in _tensor_cases(c, a, v)]
            continue
        # None where the argument is optional (a default the call may use) is valid
        bad = [(m, x, "any" if x is None and a in c.optional else "reject")
               for m, x in {bool: BOOL_BAD, int: INT_BAD, float: FLOAT_BAD, str: STR_BAD}[type(v)]]
        cases += [(a, m, _set(a, x), e) for m, x, e in bad]
        if isinstance(v, bool):
            cases.append((a, "flipped", _set(a, not v), "any"))
        elif isinstance(v, int):
            cases += [(a, m, _set(a, x), "any") for m, x in INT_ODD]
        elif isinstance(v, float):
            cases += [(a, m, _set(a, x), "any") for m, x in FLOAT_ODD]
        for x in c.reject.get(a, ()):
            cases.append((a, f"refused={x!r}", _set(a, x), "reject"))
    for o in c.outputs:
        if o in tensors:
            cases += [(o, m, f, e) for m, f, e in _alias_cases(c, o, tensors)]
    return [Case(f"{base}:{a}:{m}", base, a, f, e) for a, m, f, e in cases]
