"""Prometheus metrics of one server (prometheus-client, its own registry).

Names start with ``codistill_serving_``. Series labelled ``model_version`` exist only
for bundles the server holds (``serving``, ``candidate``, ``previous``):
:meth:`ServingMetrics.forget` removes a version's series when it is unloaded, so a
dashboard never shows a model that is gone and label cardinality stays bounded.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# sub-millisecond resolution: a BoW student ranks 20 candidates in well under 1 ms
# (p50 0.20 ms in process, benchmarks/results/serving-demo.json)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                   0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServingMetrics:
    """Every metric the server exports; one instance per app."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "codistill_serving_"
        self.latency = Histogram(p + "request_latency_seconds", "Request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.rank_latency = Histogram(p + "rank_latency_seconds",
                                      "/v1/rank latency by the bundle that answered",
                                      ["model_version"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter(p + "requests_total", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge(p + "in_flight_requests", "Requests being served", registry=r)
        self.candidates = Counter(p + "candidates_total", "Candidates ranked",
                                  ["model_version"], registry=r)
        self.fallbacks = Counter(p + "fallback_candidates_total", "Candidates encoded by the "
                                 "fallback graph (no teacher vector)", ["model_version"],
                                 registry=r)
        self.cache_hits = Counter(p + "vector_cache_hits_total", "Teacher vectors from memory",
                                  registry=r)
        self.cache_misses = Counter(p + "vector_cache_misses_total",
                                    "Teacher vectors neither in memory nor in the store",
                                    registry=r)
        self.store_errors = Counter(p + "store_errors_total", "Store calls that failed",
                                    ["op"], registry=r)
        self.queue_depth = Gauge(p + "event_queue_depth", "Events waiting for the log",
                                 registry=r)
        self.events = Counter(p + "events_total", "Events written to the log", ["type"],
                              registry=r)
        self.events_dropped = Counter(p + "events_dropped_total", "Events not written",
                                      ["reason"], registry=r)
        self.broker_errors = Counter(p + "broker_errors_total", "Event-log writes that failed",
                                     registry=r)
        self.swaps = Counter(p + "swaps_total", "Serving bundle replaced", registry=r)
        self.promotions = Counter(p + "promotions_total", "Bundles promoted", registry=r)
        self.rollbacks = Counter(p + "rollbacks_total", "Rollbacks to the previous bundle",
                                 registry=r)
        self.load_failures = Counter(p + "load_failures_total", "Bundles refused at load "
                                     "(hash, probe)", ["reason"], registry=r)
        self.model_info = Gauge(p + "model_info", "1 per bundle held, by slot",
                                ["model_version", "slot", "kind", "teacher_version",
                                 "precision"], registry=r)
        self.ready = Gauge(p + "ready", "1 when /readyz is true", registry=r)
        self._info: dict[str, tuple[str, ...]] = {}

    def set_slot(self, version: str, slot: str, kind: str, teacher: str, precision: str) -> None:
        old = self._info.pop(version, None)
        if old is not None:
            self.model_info.remove(*old)
        labels = (version, slot, kind, teacher, precision)
        self.model_info.labels(*labels).set(1)
        self._info[version] = labels

    def labelled_versions(self) -> list[str]:
        return list(self._info)

    def forget(self, version: str) -> None:
        """Remove every series of an unloaded bundle."""
        old = self._info.pop(version, None)
        if old is not None:
            self.model_info.remove(*old)
        for metric in (self.rank_latency, self.candidates, self.fallbacks):
            with contextlib.suppress(KeyError):
                metric.remove(version)
