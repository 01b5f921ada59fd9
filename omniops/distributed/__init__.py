"""Expert parallelism across ranks: ``ep_dispatch`` / ``ep_combine`` over torch.distributed all-to-all,
``ExpertPlacement`` (logical <-> physical experts, redundant copies) and the ``EPMoE`` module."""

from __future__ import annotations

from omniops.distributed.ep import (
    EPDispatch,
    EPHandle,
    EPMoE,
    ExpertPlacement,
    apply_expert_placement,
    ep_combine,
    ep_dispatch,
)

__all__ = ["EPDispatch", "EPHandle", "EPMoE", "ExpertPlacement", "apply_expert_placement", "ep_combine", "ep_dispatch"]
