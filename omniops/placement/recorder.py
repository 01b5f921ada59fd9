"""Per-layer, per-expert token counts from the MoE dispatch, for the placement planners.

Cost on the serving path: one ``scatter_add_`` per MoE layer per step into a preallocated [L, E] counter on the
device of ``topk_ids`` (a bincount without the host sync that ``torch.bincount`` needs to size its output, so it
also works under CUDA graphs). Closing a step (``step()``) folds the counter into a sliding window or an EMA;
``weight()`` hands the planners a [L, E] float64 CPU tensor.

Wiring into an EP MoE module: ``EPMoE(..., recorder=rec, layer_idx=i)`` records every forward's dispatch counts
(``record_counts``: the bincount the dispatch computes anyway); call ``recorder.step()`` once per forward step, and
between steps feed ``EPMoE.global_load()`` (the weight summed over ranks) to ``incremental_rebalance``, then
``EPMoE.apply_placement``. Elsewhere: ``recorder.record(layer_idx, topk_ids)`` after routing.
"""

from __future__ import annotations

import torch

from omniops.placement._common import check_int


class LoadRecorder:
    """Accumulates expert loads.

    Args:
        num_layers: MoE layers L.
        num_experts: logical experts E.
        mode: ``"window"`` (sum over the last ``window`` steps) or ``"ema"`` (``decay`` per step).
        window: steps kept in window mode.
        decay: EMA factor in (0, 1): ``ema = decay * ema + (1 - decay) * step_counts``.
        device: where the per-step counter lives (the device of ``topk_ids``).
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        mode: str = "window",
        window: int = 32,
        decay: float = 0.9,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_layers = check_int("num_layers", num_layers, minimum=1)
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        if mode not in ("window", "ema"):
            raise ValueError(f"mode: expected 'window' or 'ema', got {mode!r}")
        self.mode = mode
        self.window = check_int("window", window, minimum=1)
        if not (isinstance(decay, (int, float)) and 0.0 < float(decay) < 1.0):
            raise ValueError(f"decay: expected a float in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._current = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=self.device)
        self._history = torch.zeros(self.window if mode == "window" else 1, num_layers, num_experts,
                                    dtype=torch.float64)
        self._ema = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self._pos = 0
        self.steps = 0

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Add one layer's routing decisions (``topk_ids`` [tokens, k], ids in [0, E)) to the current step."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")
        if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
            raise ValueError("topk_ids: expected an integer tensor of expert ids")
        ids = topk_ids.reshape(-1).to(device=self.device, dtype=torch.int64)
        self._current[layer].scatter_add_(0, ids, torch.ones_like(ids))

    def record_counts(self, layer: int, counts: torch.Tensor) -> None:
        """Add one layer's per-expert token counts ``[E]`` (an EP dispatch's bincount, already computed for the
        all-to-all) to the current step: one add of E elements instead of a scatter over every routed pair."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")
        if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (self.num_experts,):
            raise ValueError(f"counts: expected a tensor of shape [{self.num_experts}]")
        if counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise ValueError("counts: expected an integer tensor of token counts")
        self._current[layer] += counts.to(device=self.device, dtype=torch.int64)

    def record_all(self, topk_ids: torch.Tensor) -> None:
        """All layers at once: ``topk_ids`` [L, tokens, k] -> one scatter for the whole step."""
        if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() < 2 or topk_ids.shape[0] != self.num_layers:
            raise ValueError(f"topk_ids: expected an integer tensor [num_layers={self.num_layers}, tokens, k]")
        if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
            raise ValueError("topk_ids: expected an integer tensor of expert ids")
        ids = topk_ids.reshape(self.num_layers, -1).to(device=self.device, dtype=torch.int64)
        offset = torch.arange(self.num_layers, device=self.device)[:, None] * self.num_experts
        flat = (ids + offset).reshape(-1)
        self._current.view(-1).scatter_add_(0, flat, torch.ones_like(flat))

    def add_counts(self, counts: torch.Tensor) -> None:
        """Add precomputed [L, E] counts to the current step (simulators, or a fused dispatch kernel)."""
        if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (self.num_layers, self.num_experts):
            raise ValueError(f"counts: expected a tensor of shape [{self.num_layers}, {self.num_experts}]")
        if counts.dtype.is_floating_point:
            if not torch.isfinite(counts).all() or (counts < 0).any():
                raise ValueError("counts: expected finite non-negative counts")
            counts = counts.round()
        elif (counts < 0).any():
            raise ValueError("counts: expected non-negative counts")
        self._current += counts.to(device=self.device, dtype=torch.int64)

    def step(self) -> None:
        """Close the current step: fold its counts into the window / EMA and start a new one."""
        cur = self._current.to("cpu", torch.float64)
        if self.mode == "window":
            self._history[self._pos] = cur
            self._pos = (self._pos + 1) % self.window
        else:
            self._ema.mul_(self.decay).add_(cur, alpha=1.0 - self.decay)
        self._current.zero_()
        self.steps += 1

    def weight(self) -> torch.Tensor:
        """[L, E] float64 CPU loads for ``rebalance_experts`` / ``incremental_rebalance``.

        Window mode: token counts summed over the last ``window`` closed steps. EMA mode: the EMA, bias-corrected
        for the first steps so that it is on the scale of one step's counts.
        """
        if self.mode == "window":
            return self._history.sum(0)
        if self.steps == 0:
            return self._ema.clone()
        return self._ema / (1.0 - self.decay**self.steps)

    def reset(self) -> None:
        self._current.zero_()
        self._history.zero_()
        self._ema.zero_()
        self._pos = 0
        self.steps = 0
