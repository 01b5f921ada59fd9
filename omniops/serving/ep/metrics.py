"""Prometheus metrics of the expert-parallel engine, registered next to omni-serve's own (same ``model_name``
label):

* ``omni:expert_load_imbalance{layer}`` gauge: max / mean (token, expert) rows per rank over the last placement
  window, per MoE layer (decoder layer index); 1 = perfectly balanced, N = one rank does all the work.
* ``omni:placement_updates_total``: placements applied that changed at least one slot.
* ``omni:placement_moved_experts_total``: expert slots whose weights were copied in, over all updates.
* ``omni:placement_seconds`` histogram: plan + weight move time of each update.

Read from ``EPEngine.stats``, which the engine thread replaces as a whole: a scrape never touches the engine.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from omniops.serving.ep.driver import EPEngine
from omniops.serving.ep.placement_loop import SECONDS_BUCKETS


class EPMetrics:
    def __init__(self, ep: EPEngine, model_name: str):
        self.ep, self.model_name = ep, model_name

    def collect(self) -> Iterator[Metric]:
        s, name = self.ep.stats, self.model_name
        g = GaugeMetricFamily("omni:expert_load_imbalance", "Max / mean routed rows per EP rank over the last "
                              "placement window, per MoE layer.", labels=["model_name", "layer"])
        for layer, v in sorted(s.imbalance.items()):
            g.add_metric([name, str(layer)], v)
        yield g
        c = CounterMetricFamily("omni:placement_updates", "Expert placements applied (at least one slot changed).",
                                labels=["model_name"])
        c.add_metric([name], s.updates)
        yield c
        c = CounterMetricFamily("omni:placement_moved_experts", "Expert slots whose weights were moved by placement "
                                "updates.", labels=["model_name"])
        c.add_metric([name], s.moved)
        yield c
        counts = [0] * (len(SECONDS_BUCKETS) + 1)
        for v in s.seconds:
            counts[bisect.bisect_left(SECONDS_BUCKETS, v)] += 1
        cum, buckets = 0, []
        for bound, n in zip((*map(str, SECONDS_BUCKETS), "+Inf"), counts, strict=True):
            cum += n
            buckets.append((bound, cum))
        h = HistogramMetricFamily("omni:placement_seconds", "Plan + weight move time of each placement update.",
                                  labels=["model_name"])
        h.add_metric([name], buckets, sum(s.seconds))
        yield h


def register(registry, ep: EPEngine, model_name: str) -> EPMetrics:
    m = EPMetrics(ep, model_name)
    registry.register(m)
    return m


def attach_server(ep: EPEngine, app, server, model_name: str) -> None:
    """omni-serve: the EP metrics next to the server's, and a failed rank stops the server (uvicorn's
    ``should_exit``, read by its main loop; the failed step's requests already got their error)."""
    register(app.state.metrics.registry, ep, model_name)
    ep.on_failure.append(lambda _err: setattr(server, "should_exit", True))
