"""Argument checks shared by every op: one place, clear messages naming the argument.

Checks here look only at metadata (dtype, device, shape, strides), so they also run on FakeTensors at trace
time. Checks that read values (positions, block tables) live with their op and are skipped on fake tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BYTES = 2**63 - 1


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    dim: int | Sequence[int] | None = None,
    min_dim: int | None = None,
) -> torch.Tensor:
    # Called on every op call: the success path does no allocation; messages are built only on failure.
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not torch.compiler.is_compiling():  # (Dynamo cannot trace is_neg; traced sizes are symbolic)
        if t.is_neg() or t.is_conj():  # the kernels read raw memory: a lazy sign / conjugate bit would be lost
            raise ValueError(f"{name}: has a lazy negative/conjugate bit; call resolve_neg() / resolve_conj() first")
        n = t.numel()
        if type(n) is int and n * t.element_size() > _MAX_BYTES:
            # Only a stride-0 view claims this much; an output of its size could not even be sized.
            raise ValueError(f"{name}: claims {n} elements of {t.element_size()} bytes, past the int64 byte range "
                             f"(shape {list(t.shape)})")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    if dim is not None:
        ndim = t.dim()
        if ndim != dim if isinstance(dim, int) else ndim not in dim:
            dims = (dim,) if isinstance(dim, int) else tuple(dim)
            raise ValueError(f"{name}: expected a {' or '.join(map(str, dims))}-D tensor, got shape {list(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {list(t.shape)}")
    return t


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(
            f"{name}: expected dtype {str(ref.dtype).removeprefix('torch.')} (as {ref_name}), "
            f"got {str(t.dtype).removeprefix('torch.')}"
        )


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {list(expected)}{hint}, got {list(t.shape)}")


def is_fake(t: torch.Tensor) -> bool:
    """True for FakeTensors / meta tensors, whose values cannot be read."""
    return t.device.type == "meta" or type(t) is not torch.Tensor


def rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a [rows, last] view with unit inner stride (no copy), or None if its layout does not allow it."""
    if t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1):
        return t
    if t.dim() == 0:
        return None
    if t.is_contiguous():  # the common case, without the stride walk below
        return t.view(-1, t.shape[-1]) if t.numel() else t.reshape(-1, t.shape[-1])
    last = t.shape[-1]
    if t.dim() == 1:
        return t.unsqueeze(0) if (last <= 1 or t.stride(-1) == 1) else None
    if last > 1 and t.stride(-1) != 1:
        return None
    # Leading dims must collapse into one with a single row stride.
    row_stride = None
    expected = None
    for size, stride in reversed(list(zip(t.shape[:-1], t.stride()[:-1], strict=True))):
        if size == 1:
            continue
        if expected is None:
            row_stride = stride
            expected = stride * size
        elif stride != expected:
            return None
        else:
            expected = stride * size
    rows = math.prod(t.shape[:-1])
    return t.as_strided((rows, last), (row_stride if row_stride is not None else last, 1))


# ---- scalars: validated as the kernels use them ---------------------------------------------------------------
_FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max; a larger double becomes inf in fp32


def check_int(name: str, v: object, *, lo: int = -2**63, hi: int = 2**63 - 1) -> int:
    """An int (not a bool, not a float: 1.5 would be truncated) in [lo, hi] (default: int64, what the op schemas
    and kernels take); SymInts pass through."""
    if isinstance(v, torch.SymInt):
        return v  # type: ignore[return-value]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):  # numpy integers too
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {v}")
    return v


def check_float(name: str, v: object, *, lo: float | None = None) -> float:
    """A real number finite in float32 (what the kernels compute with; 1e39 is finite only as a double), >= lo."""
    if isinstance(v, torch.SymFloat):
        return v  # type: ignore[return-value]
    if isinstance(v, bool) or not isinstance(v, numbers.Real):  # numpy scalars too
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    f = float(v) if not isinstance(v, int) or abs(v) <= 2**1023 else math.inf
    if not math.isfinite(f) or abs(f) > _FP32_MAX:
        raise ValueError(f"{name}: expected a number finite in float32 (|x| <= 3.4e38), got {v!r}")
    if lo is not None and f < lo:
        raise ValueError(f"{name}: expected a finite number >= {lo}, got {v!r}")
    return f


def check_bool(name: str, v: object) -> bool:
    """A bool (not an int: causal=2 is a mistake, not True)."""
    if isinstance(v, torch.SymBool):
        return v  # type: ignore[return-value]
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return v


def check_int32_size(name: str, value: int, what: str) -> None:
    """Sizes the kernels index with int32 (rows of a dispatch, key positions, ...)."""
    if value > 2**31 - 1:
        raise ValueError(f"{name}: {what} = {value} exceeds the kernels' limit of {2**31 - 1} (int32 indices)")


# ---- index values (skipped on fake tensors; the C++ entry points check them again themselves) ------------------
def check_block_table(block_table: torch.Tensor, lens: torch.Tensor, lens_name: str, num_blocks: int,
                      block_size: int) -> None:
    """lens in [0, max_blocks * block_size]; the table entries the lengths cover in [0, num_blocks). One sync.

    Overflow-safe: block_size may be huge (a stride-0 cache view), so the number of covered entries is
    ``(len - 1) // block_size + 1``, never ``len + block_size - 1``."""
    if lens.numel() == 0 or is_fake(lens) or is_fake(block_table):
        return
    max_blocks = block_table.shape[1]
    cap = max_blocks * block_size  # a Python int: no overflow
    ln = lens.long()
    lo, hi = (int(v) for v in torch.stack((ln.min(), ln.max())).tolist())
    if lo < 0 or hi > cap:
        i = int(((ln < 0) | (ln > cap)).nonzero()[0, 0]) if cap < 2**63 else int((ln < 0).nonzero()[0, 0])
        raise ValueError(f"{lens_name}[{i}] = {int(ln[i])} is outside [0, {cap}] (block_table covers {max_blocks} "
                         f"blocks of {block_size} tokens)")
    nblk = torch.where(ln > 0, (ln - 1) // block_size + 1, torch.zeros_like(ln))
    covered = torch.arange(max_blocks, device=lens.device)[None, :] < nblk[:, None]
    bad = covered & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is outside [0, {num_blocks}) "
                         f"(num_blocks of the cache)")


def check_values(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """Every value of an index tensor in [lo, hi) (skipped on fake tensors)."""
    if is_fake(t) or t.numel() == 0:
        return
    mn, mx = (int(v) for v in torch.aminmax(t.long()))
    if mn < lo or mx >= hi:
        raise ValueError(f"{name}: values must lie in [{lo}, {hi}), got min {mn}, max {mx}")


# ---- the overlap rule (the C++ entry points apply the same one; this serves the reference / triton paths) ------
def _layout(t: torch.Tensor) -> tuple[list[tuple[int, int]], int, int]:
    """(dims, element size, lowest address): the dims of size > 1 as (stride, size) in bytes, largest stride first
    (stride-0 dims repeat memory and are dropped) - ascendc/bindings/checks.cpp: LayoutOf."""
    es = t.element_size()
    base = t.data_ptr()
    dims = []
    for n, st in zip(t.shape, t.stride(), strict=True):
        if n > 1 and st:
            if st < 0:
                base += (n - 1) * st * es
            dims.append((abs(st) * es, n))
    dims.sort(reverse=True)
    return dims, es, base


def _extent(dims: list[tuple[int, int]], es: int, start: int) -> int:
    return es + sum((n - 1) * st for st, n in dims[start:])


def _disjoint(a: tuple, ia: int, a0: int, b: tuple, ib: int, b0: int) -> bool:
    """No common byte (checks.cpp: Disjoint): with S the larger outermost stride and both rows no longer than S,
    b's rows sit at offset d = (b0 - a0) mod S, or d - S, from a's - the same question one dimension down."""
    (ad, aes), (bd, bes) = a, b
    if a0 + _extent(ad, aes, ia) <= b0 or b0 + _extent(bd, bes, ib) <= a0:
        return True
    if ia == len(ad) and ib == len(bd):
        return False
    sa, sb = (ad[ia][0] if ia < len(ad) else 0), (bd[ib][0] if ib < len(bd) else 0)
    s = max(sa, sb)
    ra, rb = ia + (sa == s), ib + (sb == s)
    if _extent(ad, aes, ra) > s or _extent(bd, bes, rb) > s:
        return False
    d = (b0 - a0) % s
    return _disjoint(a, ra, 0, b, rb, d) and _disjoint(a, ra, 0, b, rb, d - s)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """None, 'same' (the identical view) or 'partial'."""
    if a.numel() == 0 or b.numel() == 0:
        return None
    if a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride():
        return "same"
    (ad, aes, abase), (bd, bes, bbase) = _layout(a), _layout(b)
    return None if _disjoint((ad, aes), 0, abase, (bd, bes), 0, bbase) else "partial"


def _self_overlaps(t: torch.Tensor) -> bool:
    dims = sorted((abs(st), n) for n, st in zip(t.shape, t.stride(), strict=True) if n > 1)
    ext = 0
    for st, n in dims:
        if st <= ext:
            return True
        ext += (n - 1) * st
    return False


def check_no_overlap(outs: Sequence[tuple[str, torch.Tensor | None]], ins: Sequence[tuple[str, torch.Tensor | None]],
                     inplace: Sequence[tuple[str, str]] = ()) -> None:
    """Every output has distinct memory per element and overlaps no other output and no input, except that an
    (output, input) pair in ``inplace`` may be the identical view. Skipped on fake tensors."""
    live = [(n, t) for n, t in outs if t is not None and t.numel() and not is_fake(t)]
    srcs = [(n, t) for n, t in ins if t is not None and not is_fake(t)]
    for i, (name, o) in enumerate(live):
        if _self_overlaps(o):
            raise ValueError(f"{name}: its elements overlap in memory (shape {list(o.shape)}, strides "
                             f"{list(o.stride())}); an output needs distinct memory per element")
        for other, p in live[i + 1:]:
            if _overlap(o, p):
                raise ValueError(f"{name} must not overlap {other} (two outputs cannot share memory)")
        for src, t in srcs:
            ov = _overlap(o, t)
            if ov is None or (ov == "same" and (name, src) in inplace):
                continue
            if (name, src) in inplace:
                raise ValueError(f"{name} partially overlaps {src}: pass the same tensor for in-place, or "
                                 "non-overlapping memory")
            if ov == "same":
                raise ValueError(f"{name} must not overlap {src} (it is the same memory; the op has no in-place "
                                 "form for this pair)")
            raise ValueError(f"{name} partially overlaps {src}: {name} must not overlap {src}, an input the op reads "
                             f"while it writes {name}")
