"""Grid and tile sizing shared by the Triton launchers."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@functools.cache
def _cores(device_type: str, index: int) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index).multi_processor_count
    if device_type == "npu":  # pragma: no cover - Ascend only
        import torch_npu  # noqa: F401

        return torch.npu.get_device_properties(index).vector_core_num  # type: ignore[attr-defined]
    return 4  # the interpreter: a few programs exercise the persistent loop without being slow


def persistent_grid(tiles: int, device: torch.device, programs_per_core: int = 4) -> tuple[int]:
    """Number of programs for ``tiles`` units of work: at most a few per core, at least 1."""
    cores = _cores(device.type, device.index or 0)
    return (max(1, min(tiles, cores * programs_per_core)),)


def pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= n (tile sizes: tl.arange needs one), at least ``lo``."""
    return max(lo, 1 << max(int(n) - 1, 0).bit_length())


@triton.jit
def row_block(tile, n_col_blocks, BLOCK: tl.constexpr):
    """Work item ``tile`` of a (row, column block) loop: its row and that block's BLOCK column indices."""
    return tile // n_col_blocks, (tile % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
