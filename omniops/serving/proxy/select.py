"""A pool of engines and its policy: the per-pool state the policy functions read and update, and ``pick``.

``pick`` applies the policy to the healthy engines of the pool that this request has not tried yet (all
healthy ones if it tried them all), so a retry goes elsewhere whenever there is an elsewhere.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from omniops.serving.proxy import policies as P
from omniops.serving.proxy.backends import Backend
from omniops.serving.proxy.radix import RadixTree


@dataclass
class RequestInfo:
    text: str  # the prompt as text (the cache_aware tree's key)
    num_tokens: int  # prompt length, in tokens (estimated without a tokenizer)
    max_tokens: int


@dataclass
class Selector:
    policy: str
    backends: list[Backend]
    seed: int = 0
    cache: P.CacheAwareConfig = field(default_factory=P.CacheAwareConfig)
    request_limit: int = 64  # pd_score_balance: per decode engine
    bucket_thresholds: tuple[int, ...] = (512,)  # length_bucket
    half_life: float = 10.0  # length_balance
    counter: int = 0
    tree: RadixTree = field(default_factory=RadixTree)
    rng: random.Random | None = None

    def __post_init__(self) -> None:
        if self.policy not in P.POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(P.POLICIES)}, got {self.policy!r}")
        self.rng = random.Random(self.seed)

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.healthy]

    def pick(self, info: RequestInfo, tried: set[str] = frozenset(), in_prefill: list[int] = ()) -> Backend | None:
        cands = [b for b in self.backends if b.healthy and b.url not in tried] or self.healthy()
        if not cands:
            return None
        if self.policy == "length_bucket":
            bucket = P.length_bucket(info.num_tokens, self.bucket_thresholds)
            members = {self.backends[i].url for i in
                       P.bucket_members(len(self.backends), len(self.bucket_thresholds) + 1, bucket)}
            cands = [b for b in cands if b.url in members] or cands  # a bucket with none left borrows
        loads = [b.load() for b in cands]
        p, n = self.policy, info.num_tokens
        if p == "round_robin":
            i = P.round_robin(len(cands), self.counter)
            self.counter += 1
        elif p in ("least_outstanding", "length_bucket"):
            i = P.least_outstanding(loads)
        elif p == "power_of_two":
            i = P.power_of_two(loads, self.rng)
        elif p == "cache_aware":
            i = P.cache_aware(self.tree, loads, info.text, self.cache)
        elif p == "prefill_score_balance":
            i = P.prefill_score_balance(loads, [b.cost for b in cands], n)
        elif p == "pd_score_balance":
            i = P.pd_score_balance(loads, [self.request_limit] * len(cands), list(in_prefill), n)
        else:  # length_balance
            i = P.length_balance([b.history for b in cands], n, time.monotonic(), self.half_life)
        return cands[i]
