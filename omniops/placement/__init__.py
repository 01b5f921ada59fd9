"""Expert placement for expert-parallel MoE serving (wip)."""

from omniops.placement.rebalance import rebalance_experts

__all__ = ["rebalance_experts"]
