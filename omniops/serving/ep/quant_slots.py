"""One rank's quantized expert slots (``--ep N --quantization w8a8|fp8_block|w4a16``).

A quantized served model keeps each expert as two ``QuantLinear`` (w13, w2; ``FusedMoE.quant``), each with its
scheme's tensors (int8 weight + per-channel scales, fp8 weight + 128x128 block scales, packed int4 + group
scales). Every expert of one layer has the same shapes, so a rank stacks each tensor over its slots
(``[slots, ...]``): that is the row-per-slot layout ``apply_expert_placement`` moves, so a placement update copies
a slot's weights *and* scales together, rank to rank. Each slot computes through a ``QuantLinear`` whose tensors
are views of those rows, so a copied row is what the next step reads; the copy moves the stacked tensor's
version counter, which makes the prepacked AMX-INT8 tiles of its views stale (``omniops.ops.prepack``), as a
copy into the bf16 ``w13`` / ``w2`` does.

The computation is the single-process ``FusedMoE``'s quantized path on the rows this rank received (the same
``moe_dispatch`` -> per-expert quantized linears -> ``moe_combine``), so a row's output does not depend on where
its expert runs: greedy tokens equal ``--ep 1`` with the same quantization.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

import omniops
from omniops.quant import QuantLinear
from omniops.serving.models.base import quantized_experts


def _tensor_fields(qw) -> list[str]:
    return [f.name for f in dataclasses.fields(qw) if isinstance(getattr(qw, f.name), Tensor)]


class QuantSlots:
    """The quantized experts of one rank's slots. ``pairs``: the layer's ``(w13, w2)`` serving ``Linear`` pairs
    (``FusedMoE.quant``, one per logical expert), ``local``: the logical expert of each local slot."""

    def __init__(self, pairs: list, local: list[int]):
        self.tensors: list[Tensor] = []  # every stacked [slots, ...] tensor, w13's then w2's: what a placement moves
        per_part = []
        for part in range(2):
            qws = [pairs[e][part].quant.quantized_weight() for e in local]
            names = _tensor_fields(qws[0])
            # clones: the per-expert tensors of every logical expert are freed once the FusedMoE is replaced
            stacked = {n: torch.stack([getattr(q, n) for q in qws]).contiguous() for n in names}
            self.tensors += list(stacked.values())
            per_part.append((qws[0], stacked))
        self.linears = [
            tuple(QuantLinear(dataclasses.replace(proto, **{n: t[j] for n, t in stacked.items()}))
                  for proto, stacked in per_part)
            for j in range(len(local))
        ]

    @property
    def scheme(self) -> str:
        return self.linears[0][0].scheme

    def __call__(self, x: Tensor, local_ids: Tensor) -> Tensor:
        """Rows ``x [n, H]`` through the local slot ``local_ids [n]`` each -> ``[n, H]`` (unweighted)."""
        return quantized_experts(x, local_ids.view(-1, 1), torch.ones(x.shape[0], 1, dtype=torch.float32),
                                 self.linears)


def shared_rows(pairs: list, x: Tensor) -> Tensor:
    """Every shared expert (replicated on every rank, not placed) on every row of ``x [n, H]`` -> ``[n, m, H]``."""
    return torch.stack([w2(omniops.silu_and_mul(w13(x))) for w13, w2 in pairs], dim=1)
