"""Continuous batching with chunked prefill under a token budget, FCFS, preemption by recompute.

Each step (vLLM v1's unified scheme: no separate prefill and decode phases) gives every running request the
tokens it still lacks — one for a decoding request, a chunk for one still in prefill — then admits waiting
requests in arrival order while the token budget (``max_num_batched_tokens``), ``max_num_seqs`` and the KV
blocks allow. When a running request cannot get a block, the most recently admitted running request is
preempted: its blocks are freed and it waits at the head of the queue to be recomputed (its generated tokens
included) later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from omniops.serving.kv_cache import KVCacheManager
from omniops.serving.request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per request, this step
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, victim: Request, batch: ScheduledBatch) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.status = Status.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        batch.preempted.append(victim)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:  # cannot happen for a live request; keep the loop safe
                i += 1
                continue
            while not self.kv.allocate(req, n):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:  # preempted itself: nothing left to make room with
                break
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            scheduled.add(id(req))
            budget -= n
            i += 1
        if batch.preempted:  # no admissions in a step that had to preempt (the pool is too tight)
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            prefix = self.kv.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
            remaining = req.num_tokens - req.num_computed_tokens - len(prefix) * self.kv.block_size
            if not self.chunked and remaining > budget:
                break
            n = min(remaining, budget)
            if not self.kv.allocate(req, n, prefix):
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:  # first admission: count it for the prefix-cache metrics
                req.num_cached_tokens = len(prefix) * self.kv.block_size
                self.kv.record_prefix_query(req.num_prompt_tokens, req.num_cached_tokens)
            req.status = Status.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def finish(self, req: Request) -> None:
        """Take a finished (or aborted) request out of the queues and free its blocks."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = Status.FINISHED
