"""omni-proxy's routing policies, each a plain function of explicit inputs (loads, state objects, the request)
returning the index of the chosen engine among the candidates it was given. The proxy calls them with the
healthy engines not yet tried for the request; unit tests drive them with synthetic loads.

Loads (``EngineLoad``) are what the proxy has in flight on each engine, corrected by the engine's own /load
(requests it reports beyond the proxy's own come from other clients; each is counted at the mean size of the
proxy's own requests there). A request's size is its prompt length L in tokens (estimated by the proxy) and
its max_tokens.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from omniops.serving.proxy.radix import RadixTree


@dataclass
class EngineLoad:
    name: str = ""
    requests: int = 0  # in flight
    tokens: int = 0  # in flight: prompt + output tokens still expected, over its requests
    prefill_cost: float = 0.0  # summed predicted prefill seconds of the prefills in flight (prefill engines)
    decode_tokens: int = 0  # context tokens of the requests decoding there (decode engines)
    prefilling: int | None = None  # of ``requests``, those still in prefill (None: all of them)


# ---- request-level balancers -------------------------------------------------------------------------------
def round_robin(n: int, counter: int) -> int:
    """i = counter mod n (the caller increments counter once per routed request)."""
    return counter % n


def _lighter(loads: Sequence[EngineLoad], i: int, j: int) -> int:
    return i if (loads[i].tokens, loads[i].requests) <= (loads[j].tokens, loads[j].requests) else j


def least_outstanding(loads: Sequence[EngineLoad]) -> int:
    """argmin_i tokens_i (fewest in-flight tokens), ties to fewer requests, then the lower index."""
    return min(range(len(loads)), key=lambda i: (loads[i].tokens, loads[i].requests, i))


def power_of_two(loads: Sequence[EngineLoad], rng: random.Random) -> int:
    """Two distinct engines drawn uniformly; the one with fewer in-flight tokens (then requests) wins."""
    if len(loads) == 1:
        return 0
    i, j = rng.sample(range(len(loads)), 2)
    return _lighter(loads, i, j)


@dataclass
class CacheAwareConfig:
    cache_threshold: float = 0.5  # matched fraction of the prompt above which the match wins
    balance_abs_threshold: int = 32  # imbalance: max - min in-flight requests above this ...
    balance_rel_threshold: float = 1.5  # ... and max above this times min: balance first, ignore the cache


def cache_aware(tree: RadixTree, loads: Sequence[EngineLoad], text: str, cfg: CacheAwareConfig) -> int:
    """sglang-router / vllm-router's policy. If the candidates are imbalanced (max - min requests >
    balance_abs_threshold and max > balance_rel_threshold * min): the one with the fewest requests. Otherwise
    the engine holding the longest prefix match m of the prompt in the tree, if m / len(prompt) >
    cache_threshold, else the least loaded (fewest in-flight tokens). The prompt is inserted under the chosen
    engine (the tree is updated as a side effect)."""
    reqs = [x.requests for x in loads]
    least = least_outstanding(loads)
    if max(reqs) - min(reqs) > cfg.balance_abs_threshold and max(reqs) > cfg.balance_rel_threshold * min(reqs):
        choice = min(range(len(loads)), key=lambda i: (reqs[i], i))
    else:
        matched, tenant = tree.prefix_match(text, {x.name for x in loads})
        names = [x.name for x in loads]
        if tenant is not None and text and matched / len(text) > cfg.cache_threshold:
            choice = names.index(tenant)
        else:
            choice = least
    tree.insert(text, loads[choice].name)
    return choice


# ---- Omni-Infer's ------------------------------------------------------------------------------------------
@dataclass
class LinearCost:
    """Prefill time model of one engine, c(L) = a * L + b seconds, least squares over its last ``window``
    measured prefills (the proxy times each prefill request). Until two distinct lengths were seen, the prior
    (a0, b0) holds; a is kept >= 0 and b >= 0 so that a noisy fit never makes longer prompts look cheaper."""

    a: float = 1e-4
    b: float = 5e-3
    window: int = 256
    samples: deque = field(default_factory=deque)

    def predict(self, num_tokens: int) -> float:
        return self.a * num_tokens + self.b

    def observe(self, num_tokens: int, seconds: float) -> None:
        self.samples.append((float(num_tokens), float(seconds)))
        while len(self.samples) > self.window:
            self.samples.popleft()
        n = len(self.samples)
        if n < 2:
            return
        mx = sum(x for x, _ in self.samples) / n
        my = sum(y for _, y in self.samples) / n
        sxx = sum((x - mx) ** 2 for x, _ in self.samples)
        if sxx <= 0:
            return
        a = sum((x - mx) * (y - my) for x, y in self.samples) / sxx
        self.a = max(a, 0.0)
        self.b = max(my - self.a * mx, 0.0)


def prefill_score_balance(loads: Sequence[EngineLoad], costs: Sequence[LinearCost], num_tokens: int) -> int:
    """Per engine: A in-flight prefills (``prefilling``; on a prefill engine every in-flight request), T =
    their summed predicted cost (``prefill_cost``), c = a*L + b this request's predicted cost there. Pick
    argmin T + c * (A + 1): the time the engine needs for what it has plus this request, charging c once per
    request it shares its batch with."""
    def score(i: int) -> float:
        c = costs[i].predict(num_tokens)
        a = loads[i].requests if loads[i].prefilling is None else loads[i].prefilling
        return loads[i].prefill_cost + c * (a + 1)
    return min(range(len(loads)), key=lambda i: (score(i), i))


def pd_score_balance(loads: Sequence[EngineLoad], limits: Sequence[int], in_prefill: Sequence[int],
                     num_tokens: int) -> int:
    """Decode side. Simulate the requests now in prefill (their prompt lengths ``in_prefill``) plus this one,
    longest first (this one after others of equal length), each placed on the decode engine with the least
    load among those below their request limit (all engines if none is); an engine's load starts at its
    in-flight decode tokens and grows by each placed length, its request count at its in-flight requests.
    The request goes where the simulation puts it."""
    load = [float(x.decode_tokens) for x in loads]
    count = [x.requests for x in loads]
    items = sorted([(n, 0) for n in in_prefill] + [(num_tokens, 1)], key=lambda t: (-t[0], t[1]))
    for n, me in items:
        open_ = [i for i in range(len(loads)) if count[i] < limits[i]] or list(range(len(loads)))
        i = min(open_, key=lambda k: (load[k], k))
        if me:
            return i
        load[i] += n
        count[i] += 1
    raise AssertionError("unreachable: the request itself is among the items")


@dataclass
class DecayedHistory:
    """An engine's recent traffic: request count C and token sum S, each decaying as 2^(-dt / half_life)."""

    count: float = 0.0
    tokens: float = 0.0
    t: float = 0.0

    def at(self, now: float, half_life: float) -> tuple[float, float]:
        f = math.pow(2.0, -max(now - self.t, 0.0) / half_life)
        return self.count * f, self.tokens * f

    def add(self, now: float, half_life: float, num_tokens: int) -> None:
        c, s = self.at(now, half_life)
        self.count, self.tokens, self.t = c + 1, s + num_tokens, now


def length_balance(hist: Sequence[DecayedHistory], num_tokens: int, now: float, half_life: float = 10.0) -> int:
    """Omni-Infer's length balance on the decayed history of what each engine was sent: with C_i, S_i its
    decayed request count and tokens and m = sum S / sum C the recent mean length (L if no history), pick
    argmin S_i + m * C_i (tokens plus a per-request cost of one mean request), then record (1, L) on it."""
    cs = [h.at(now, half_life) for h in hist]
    total_c = sum(c for c, _ in cs)
    m = sum(s for _, s in cs) / total_c if total_c > 0 else float(num_tokens)
    # rounded: a history decayed to nothing is a tie, not a ranking by 1e-30-token residues
    i = min(range(len(hist)), key=lambda k: (round(cs[k][1] + m * cs[k][0], 6), k))
    hist[i].add(now, half_life, num_tokens)
    return i


def length_bucket(num_tokens: int, thresholds: Sequence[int]) -> int:
    """Bucket b = number of thresholds <= L: with thresholds [512], prompts < 512 tokens are bucket 0."""
    return sum(1 for t in thresholds if num_tokens >= t)


def bucket_members(num_engines: int, num_buckets: int, bucket: int) -> list[int]:
    """The engines of a bucket: the engine list cut into num_buckets contiguous groups, sizes as equal as they
    can be (engine i is in group floor(i * num_buckets / num_engines)). With fewer engines than buckets,
    every bucket has them all."""
    if num_engines < num_buckets:
        return list(range(num_engines))
    return [i for i in range(num_engines) if i * num_buckets // num_engines == bucket]


POLICIES = ("round_robin", "least_outstanding", "power_of_two", "cache_aware", "prefill_score_balance",
            "pd_score_balance", "length_balance", "length_bucket")
