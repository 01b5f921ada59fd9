"""Transfer counters and the ``omni:kv_transfer_*`` Prometheus families (written from transfer threads, read at
scrape time, so every update and read takes the lock)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DIRECTIONS = ("sent", "received")


class TransferStats:
    def __init__(self):
        self.lock = threading.Lock()
        self.blocks = dict.fromkeys(DIRECTIONS, 0)
        self.transfers = dict.fromkeys(DIRECTIONS, 0)
        self.buckets = {d: [0] * (len(SECONDS_BUCKETS) + 1) for d in DIRECTIONS}
        self.seconds = dict.fromkeys(DIRECTIONS, 0.0)
        self.failures = 0  # pulls that failed (the decode engine recomputed the prompt instead)
        self.timeouts = 0  # holds freed without an ack
        self.held_blocks = lambda: 0  # the prefill side's server reports it

    def observe(self, direction: str, blocks: int, seconds: float) -> None:
        with self.lock:
            self.blocks[direction] += blocks
            self.transfers[direction] += 1
            self.buckets[direction][bisect.bisect_left(SECONDS_BUCKETS, seconds)] += 1
            self.seconds[direction] += seconds

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def families(self, model_name: str) -> Iterator[Metric]:
        with self.lock:
            blocks, buckets, seconds = dict(self.blocks), {d: list(b) for d, b in self.buckets.items()}, \
                dict(self.seconds)
            failures, timeouts = self.failures, self.timeouts
        c = CounterMetricFamily("omni:kv_transfer_blocks", "KV blocks transferred between engines.",
                                labels=["model_name", "direction"])
        for d in DIRECTIONS:
            c.add_metric([model_name, d], blocks[d])
        yield c
        h = HistogramMetricFamily("omni:kv_transfer_seconds", "Duration of one request's KV transfer.",
                                  labels=["model_name", "direction"])
        for d in DIRECTIONS:
            cum, out = 0, []
            for bound, n in zip((*map(str, SECONDS_BUCKETS), "+Inf"), buckets[d], strict=True):
                cum += n
                out.append((bound, cum))
            h.add_metric([model_name, d], out, seconds[d])
        yield h
        for name, value, doc in (("kv_transfer_failures", failures, "KV pulls that failed (prompt recomputed)."),
                                 ("kv_transfer_timeouts", timeouts, "Held prefill blocks freed without an ack.")):
            c = CounterMetricFamily(f"omni:{name}", doc, labels=["model_name"])
            c.add_metric([model_name], value)
            yield c
        g = GaugeMetricFamily("omni:kv_held_blocks", "Prefill blocks held for decode engines to read.",
                              labels=["model_name"])
        g.add_metric([model_name], self.held_blocks())
        yield g
