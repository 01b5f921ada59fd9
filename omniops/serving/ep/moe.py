"""The expert-parallel MoE layer that replaces a served model's ``FusedMoE`` after loading.

Every rank holds the whole batch (attention is replicated, see ``omniops.serving.ep``), so running ep_dispatch
on all of it would compute every expert row ``world`` times. Instead each rank takes a contiguous slice of the
tokens (sequence parallel), routes only that slice with the family's own ``route``, sends its (token, expert)
pairs to the ranks holding the chosen copies (``ep_dispatch``, all-to-all), runs its local experts on what it
received (one ``fused_moe``), sends the rows back (``ep_combine``) and all-gathers the slices so that every rank
again holds the whole batch for the next (replicated) attention layer.

Shared experts (DeepSeek) stay on every rank: a rank computes them for its own slice and sums them in the same
fp32 combine as the routed rows, after them, as the single-process ``FusedMoE`` does (one rounding).

Quantized experts (``--quantization``): each rank stacks its slots' quantized tensors (weights and scales) and
runs the single-process quantized expert path on what it received (``omniops.serving.ep.quant_slots``).

Load statistics come from the dispatch itself (no extra pass over the tokens): its per-logical-expert bincount
goes to the engine's ``LoadRecorder`` (``record_counts``) and the number of rows this rank received to the
per-rank recorder behind ``omni:expert_load_imbalance``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

import omniops
from omniops.distributed import ExpertPlacement, apply_expert_placement, ep_combine, ep_dispatch
from omniops.placement import LoadRecorder
from omniops.serving.ep.quant_slots import QuantSlots, shared_rows

# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class EPMoELayer:
    """Callable like ``FusedMoE``: ``layer(x [T, H]) -> [T, H]``. Collective: every rank calls it on the same x."""

    def __init__(self, moe, placement: ExpertPlacement, rank: int, group: dist.ProcessGroup | None, index: int,
                 recorder: LoadRecorder, rank_recorder: LoadRecorder):
        self.route: Callable[[Tensor], tuple[Tensor, Tensor]] = moe.route
        E = self.num_routed = moe.num_routed
        self.num_shared = moe.num_shared
        if placement.num_logical != E:
            raise ValueError(f"placement: has {placement.num_logical} logical experts, the layer {E}")
        self.placement, self.rank, self.group, self.index = placement, rank, group, index
        self.world = placement.world_size
        local = placement.local_logical(rank)
        self.quant: QuantSlots | None = None
        self.shared_quant = None
        if moe.w13 is None:  # quantized experts: each tensor stacked over the local slots (weights with scales)
            self.quant = QuantSlots(moe.quant, local.tolist())
            self.shared_quant = moe.quant[E:]
            self.w13 = self.w2 = self.sw13 = self.sw2 = None
        else:
            # clones: the full [E, ...] tensors of the FusedMoE are freed once it is replaced in the model
            self.w13 = moe.w13[local].clone()
            self.w2 = moe.w2[local].clone()
            self.sw13 = moe.w13[E:].clone() if self.num_shared else None
            self.sw2 = moe.w2[E:].clone() if self.num_shared else None
        self.recorder, self.rank_recorder = recorder, rank_recorder
        self._own = torch.zeros(self.world, dtype=torch.int64)  # one-hot row of this rank's received rows

    def _slice(self, T: int) -> tuple[int, int]:
        return T * self.rank // self.world, T * (self.rank + 1) // self.world

    def __call__(self, x: Tensor) -> Tensor:
        T = x.shape[0]
        lo, hi = self._slice(T)
        xs = x[lo:hi]
        w, ids = self.route(xs)
        d = ep_dispatch(xs, ids, w, self.placement, self.group)
        self.recorder.record_counts(self.index, d.handle.logical_counts)
        self._own[self.rank] = d.hidden.shape[0]
        self.rank_recorder.record_counts(self.index, self._own)
        extra = None
        if self.quant is not None:
            y = self.quant(d.hidden, d.local_ids)
            if self.num_shared:
                extra = (shared_rows(self.shared_quant, xs), torch.ones(xs.shape[0], self.num_shared, dtype=w.dtype))
            return self._gather(ep_combine(y, d.handle, extra), T)
        ones = torch.ones(d.hidden.shape[0], 1, dtype=torch.float32)
        y = omniops.fused_moe(d.hidden, self.w13, self.w2, ones, d.local_ids.view(-1, 1))
        if self.num_shared:
            n, ns = xs.shape[0], self.num_shared
            sids = torch.arange(ns).repeat(n)
            # each shared expert's row of each token, unweighted: [n, ns, H]
            rows = omniops.fused_moe(xs.repeat_interleave(ns, 0), self.sw13, self.sw2,
                                     torch.ones(n * ns, 1, dtype=torch.float32), sids.view(-1, 1))
            extra = (rows.view(n, ns, xs.shape[1]), torch.ones(n, ns, dtype=w.dtype))
        out = ep_combine(y, d.handle, extra)
        return self._gather(out, T)

    def _gather(self, out: Tensor, T: int) -> Tensor:
        """Every rank's slice -> the whole [T, H] on every rank (slices padded to one size for gloo)."""
        m = -(-T // self.world)
        buf = out.new_zeros(m, out.shape[1])
        buf[:out.shape[0]] = out
        full = out.new_empty(self.world * m, out.shape[1])
        _all_gather(full, buf, group=self.group)
        bounds = [T * r // self.world for r in range(self.world + 1)]
        return torch.cat([full[r * m:r * m + bounds[r + 1] - bounds[r]] for r in range(self.world)])

    @torch.no_grad()
    def apply_placement(self, phy2log: Tensor) -> int:
        """Collective, between steps: move the changed slots' weights, then switch the map (the dispatch of the
        next step is the first to see it). Returns the number of slots that changed. The map came from one
        broadcast, so the ranks' agreement check of ``apply_expert_placement`` is skipped."""
        moved = int((self.placement.phy2log != phy2log).sum())
        if moved:
            weights = self.quant.tensors if self.quant is not None else [self.w13, self.w2]
            self.placement = apply_expert_placement(weights, self.placement, phy2log, self.group, agree=False)
        return moved


def moe_layers(model) -> list[tuple[int, object]]:
    """(decoder layer index, FusedMoE) of every routed-expert block of a served model."""
    from omniops.serving.models.base import FusedMoE

    return [(i, layer["mlp"]) for i, layer in enumerate(model.layers) if isinstance(layer["mlp"], FusedMoE)]
