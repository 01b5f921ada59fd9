"""Prometheus metrics under vLLM's names with the ``omni:`` prefix, every series labelled ``model_name``.

One custom collector produces all of them at scrape time: the gauges and counters from the engine thread's
``AsyncEngine.snapshot`` (so a scrape never touches the engine), the histograms from buckets that the event loop
fills as outputs arrive. prometheus_client's own Counter / Histogram classes are not used: they rename counters
(``_total`` appended to the family name) and add ``_created`` series; the metric families below expose exactly

    omni:num_requests_running, omni:num_requests_waiting, omni:kv_cache_usage_perc,
    omni:prompt_tokens_total, omni:prompt_tokens_computed_total, omni:generation_tokens_total,
    omni:prefix_cache_queries_total, omni:prefix_cache_hits_total, omni:num_preemptions_total,
    omni:request_success_total{finished_reason}, omni:time_to_first_token_seconds,
    omni:inter_token_latency_seconds, omni:e2e_request_latency_seconds.

``kv_cache_usage_perc`` is a fraction in [0, 1] (as vLLM's is, despite the name): blocks held by live requests
over all blocks. Prefix-cached blocks that no live request holds count as FREE (the engine reclaims them on
demand), so an idle server reads 0 however full the prefix cache is. ``num_requests_waiting`` includes requests
the server has passed to the engine thread that it has not queued yet. Counters start at 0 when the server
starts serving (the startup warmup request is subtracted).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from omniops.serving.async_engine import AsyncEngine
from omniops.serving.outputs import RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST

# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)

_GAUGES = (("num_requests_running", "Requests in the running batch."),
           ("num_requests_waiting", "Requests waiting for a seat in the batch."),
           ("kv_cache_usage_perc", "Fraction of KV-cache blocks held by live requests (1 = full)."))
_COUNTERS = (("prompt_tokens", "prompt_tokens", "Prompt tokens of admitted requests."),
             ("prompt_tokens_computed", "prompt_tokens_computed", "Prompt tokens run through the model "
              "(prefix-cache hits excluded)."),
             ("generation_tokens", "generation_tokens", "Generated tokens."),
             ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
             ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
             ("num_preemptions", "num_preemptions", "Preemptions (requests whose KV was dropped to recompute)."))


class Histogram:
    """Bucket counts of one histogram, filled on the event loop (no lock: one thread writes and reads)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1  # le semantics: v == bound lands in that bucket
        self.sum += v

    def family(self, name: str, doc: str, model_name: str) -> HistogramMetricFamily:
        h = HistogramMetricFamily(name, doc, labels=["model_name"])
        cum, buckets = 0, []
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            cum += n
            buckets.append((bound, cum))
        h.add_metric([model_name], buckets, self.sum)
        return h


class ServerMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.engine: AsyncEngine | None = None
        self.engine_families: list[Metric] = []  # the engine's own (KV transfer), fetched before each render
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, out: RequestOutput, prev_token_time: float | None) -> None:
        """AsyncEngine's output hook: every step's output of a request is one new token, so consecutive outputs
        give the inter-token latencies, even when a slow client reads only every few of them."""
        m = out.metrics
        last, arrival = m.get("last_token"), m.get("arrival")
        if last is None:
            return
        if prev_token_time is None:
            if m.get("first_token") is not None and arrival is not None:
                self.ttft.observe(m["first_token"] - arrival)
        else:
            self.itl.observe(last - prev_token_time)
        if out.finished and arrival is not None:
            self.e2e.observe(last - arrival)

    def collect(self) -> Iterator[Metric]:
        snap = self.engine.snapshot if self.engine is not None else {}
        load = self.engine.load() if snap else {}
        label = [self.model_name]
        values = {"num_requests_running": load.get("running", 0), "num_requests_waiting": load.get("waiting", 0),
                  "kv_cache_usage_perc": load.get("kv_cache_usage", 0.0)}
        for name, doc in _GAUGES:
            g = GaugeMetricFamily(f"omni:{name}", doc, labels=["model_name"])
            g.add_metric(label, values[name])
            yield g
        for name, key, doc in _COUNTERS:  # CounterMetricFamily appends the "_total" of the exposition name
            c = CounterMetricFamily(f"omni:{name}", doc, labels=["model_name"])
            c.add_metric(label, snap.get(key, 0))
            yield c
        c = CounterMetricFamily("omni:request_success", "Finished requests by finish reason.",
                                labels=["model_name", "finished_reason"])
        finished = snap.get("finished", {})
        for reason in sorted({"stop", "length", "abort", *finished}):
            c.add_metric([self.model_name, reason], finished.get(reason, 0))
        yield c
        yield self.ttft.family("omni:time_to_first_token_seconds", "Time to first token.", self.model_name)
        yield self.itl.family("omni:inter_token_latency_seconds", "Time between consecutive output tokens.",
                              self.model_name)
        yield self.e2e.family("omni:e2e_request_latency_seconds", "Arrival to last token of finished requests.",
                              self.model_name)
        yield from self.engine_families  # prefill/decode engines: omni:kv_transfer_blocks_total, ...

    def render(self) -> bytes:
        return generate_latest(self.registry)
