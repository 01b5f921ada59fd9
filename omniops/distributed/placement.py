"""Where the physical copies of every logical expert live across the expert-parallel ranks.

Physical slot p lives on rank ``p // experts_per_rank`` as that rank's local expert ``p % experts_per_rank``;
``phy2log [P]`` names the logical expert in every slot and ``log2phy [E, max_replicas]`` (-1 padded) lists every
logical expert's copies, so one logical expert can have several physical replicas (redundant experts). A load
balancer only changes this map and the weights in the slots (``omniops.distributed.transfer``); dispatch and
combine take whatever map they are given. The maps are one layer of the planners' (``omniops.placement``) and
share their checks and builders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from omniops.placement import build_log2phy, logical_counts, phy2log_problem


@dataclass(frozen=True)
class ExpertPlacement:
    """Where the physical copies of every logical expert live. Build with ``from_phy2log`` or ``uniform``."""

    phy2log: Tensor  # int64 [num_physical]: the logical expert held by each physical slot
    log2phy: Tensor  # int64 [num_logical, max_replicas]: physical slots of each logical expert, -1 padded
    replicas: Tensor  # int64 [num_logical]: number of copies of each logical expert (>= 1)
    world_size: int

    @property
    def num_logical(self) -> int:
        return self.log2phy.shape[0]

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[0]

    @property
    def experts_per_rank(self) -> int:
        return self.num_physical // self.world_size

    def local_logical(self, rank: int) -> Tensor:
        """The logical expert of each of ``rank``'s local physical slots (to load its weights)."""
        per = self.experts_per_rank
        return self.phy2log[rank * per:(rank + 1) * per]

    @classmethod
    def from_phy2log(cls, phy2log: Tensor | list[int], world_size: int, num_logical: int | None = None
                     ) -> ExpertPlacement:
        """From the logical expert of every physical slot; slots split evenly over ``world_size`` ranks."""
        p2l = torch.as_tensor(phy2log, dtype=torch.int64).flatten().cpu()
        if world_size < 1 or p2l.numel() == 0 or p2l.numel() % world_size:
            raise ValueError(f"phy2log: {p2l.numel()} physical slots do not split evenly over world_size={world_size}")
        E = int(p2l.max()) + 1 if num_logical is None else num_logical
        p = p2l.numpy()[None]  # the planners' [layers, slots] maps, one layer
        problem = phy2log_problem(p, E)
        if problem is not None:
            raise ValueError(problem)
        replicas = logical_counts(p, E)[0]
        log2phy = build_log2phy(p, E, int(replicas.max()))[0]
        return cls(p2l, torch.from_numpy(log2phy), torch.from_numpy(replicas), world_size)

    @classmethod
    def uniform(cls, num_experts: int, world_size: int, num_redundant: int = 0) -> ExpertPlacement:
        """Logical expert e in slot e; ``num_redundant`` extra slots copy experts 0, 1, ... (a placeholder
        until a balancer picks the hot ones). E + num_redundant must be a multiple of world_size."""
        p2l = list(range(num_experts)) + [i % num_experts for i in range(num_redundant)]
        return cls.from_phy2log(p2l, world_size, num_experts)

    def physical_of(self, topk_ids: Tensor, rank: int = 0) -> Tensor:
        """A physical slot for every (token, slot) pair: copy ``(t + rank) % replicas[e]`` of expert e."""
        ids = topk_ids.long()
        log2phy = self.log2phy.to(ids.device)
        reps = self.replicas.to(ids.device)[ids]
        t = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)
        choice = (t + rank) % reps
        return log2phy[ids, choice]


def checked_phy2log(p: object, num_physical: int, num_logical: int, name: str = "phy2log_new"
                    ) -> tuple[Tensor | None, str | None]:
    """(map as int64 CPU [R], None) or (None, why it is not a valid placement of these slots and experts)."""
    try:
        t = torch.as_tensor(p)
    except (TypeError, ValueError, RuntimeError):
        return None, f"{name}: expected a 1-D integer tensor or list, got {type(p).__name__}"
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        return None, f"{name}: expected integer logical expert ids, got dtype {t.dtype}"
    if t.dim() != 1 or t.numel() != num_physical:
        return None, f"{name}: expected shape [{num_physical}] (one id per physical slot), got {list(t.shape)}"
    t = t.to("cpu", torch.int64)
    problem = phy2log_problem(t.numpy()[None], num_logical, name)
    return (None, problem) if problem is not None else (t, None)
