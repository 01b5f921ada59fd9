"""The process group an expert-parallel call runs over: world size and rank (1 and 0 without torch.distributed)."""

from __future__ import annotations

import torch.distributed as dist


def world_and_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
