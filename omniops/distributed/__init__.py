"""Expert parallelism across ranks: ``ep_dispatch`` / ``ep_combine`` over torch.distributed all-to-all and the
``EPMoE`` module (``ep.py``), ``ExpertPlacement`` (logical <-> physical experts, redundant copies;
``placement.py``) and ``apply_expert_placement`` (moving weights to a new placement; ``transfer.py``)."""

from __future__ import annotations

from omniops.distributed.ep import EPDispatch, EPHandle, EPMoE, ep_combine, ep_dispatch
from omniops.distributed.placement import ExpertPlacement
from omniops.distributed.transfer import apply_expert_placement

__all__ = ["EPDispatch", "EPHandle", "EPMoE", "ExpertPlacement", "apply_expert_placement", "ep_combine", "ep_dispatch"]
