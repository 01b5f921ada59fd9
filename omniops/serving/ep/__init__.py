"""Expert-parallel serving: ``omni-serve MODEL --ep N [--redundant-experts R] [--placement off|static|dynamic]
[--placement-interval STEPS]`` or ``LLM(model, ep=N, redundant_experts=R, placement=..., placement_interval=...)``.

Layout. N ranks on torch.distributed (gloo on CPU; nccl / hccl for the data group when the model sits on a GPU /
NPU). Rank 0 is the ``LLMEngine`` (scheduler, KV block manager, sampler, detokenizer, HTTP server); ranks 1..N-1
are started by it (local processes, loopback only) or by torchrun (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
``MASTER_PORT``, also across hosts, every rank running the same command).

* Attention and dense layers are replicated and every rank computes the whole batch (not data parallel over
  the batch): rank 0 broadcasts each step's flat batch (token ids + the attention metadata tensors, ~100 bytes
  per token) and every rank runs the same ``model.forward`` on its own copy of the KV cache. Why: it is exact
  (every rank's attention output is rank 0's, so greedy outputs equal ``--ep 1``), it keeps one scheduler and
  one KV block table, and prefix caching, chunked prefill and preemption work unchanged. The price is N x the
  attention FLOPs and KV memory; DP attention (each rank its own requests and cache, tokens meeting only in the
  MoE all-to-all) is the scalable step after this one and needs a per-rank scheduler.
* MoE layers: each rank holds (E + R) / N physical expert slots of the placement (R redundant copies in all).
  A rank routes a 1/N slice of the batch's tokens, ``ep_dispatch`` sends the (token, expert) pairs to the
  ranks holding the chosen copies (all-to-all), the experts run there, ``ep_combine`` brings them back and an
  all-gather reassembles the batch (``omniops.serving.ep.moe``). So no expert row is computed twice.
* Loads are recorded from the dispatch's own counts every step; placement updates run between steps
  (``omniops.serving.ep.placement_loop``), metrics: ``omni:expert_load_imbalance{layer}``,
  ``omni:placement_updates_total``, ``omni:placement_moved_experts_total``, ``omni:placement_seconds``.

Failure and recovery. A rank that dies fails rank 0's current step at once (its sockets close); a rank that
hangs fails it after ``ep_timeout`` seconds. The engine then raises ``EPRankError`` for that step and every later
one, stops its local ranks and (omni-serve) shuts the server down with exit status 1, after the in-flight
requests got their error. Recovery is a restart of the whole group by the supervisor (systemd, Kubernetes,
torchrun ``--max-restarts``): every rank holds experts no other rank has (unless R covers them), the ranks'
KV caches are replicas of state rank 0 cannot rebuild mid-step, and a gloo group cannot shrink; clients retry
their requests. A restarted engine re-learns the load within one placement interval.
"""

from __future__ import annotations

from omniops.serving.ep.driver import EPEngine, EPRankError, EPRunner, start_ep
from omniops.serving.ep.options import PLACEMENTS

__all__ = ["PLACEMENTS", "EPEngine", "EPRankError", "EPRunner", "start_ep"]
