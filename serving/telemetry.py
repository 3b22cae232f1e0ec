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
# upper bounds land exactly on 1/rank for ranks 1..5 and 10 (le="0.5" = rank 2 or worse)
RR_BUCKETS = (0.1, 0.2, 0.25, 1 / 3, 0.5, 1.0)
KL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
NDCG_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
FEEDBACK_K = (1, 3, 10)


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
        # online quality: counters, so any window is a PromQL rate() and survives restarts
        v = ["model_version"]
        self.impressions = Counter(p + "impressions_total", "Ranked lists answered", v,
                                   registry=r)
        self.feedback = Counter(p + "feedback_total", "Feedback on served lists",
                                [*v, "action"], registry=r)
        self.feedback_at_k = Counter(p + "feedback_at_k_total", "Feedback on a candidate "
                                     "at rank <= k", [*v, "action", "k"], registry=r)
        self.reciprocal_rank = Histogram(p + "reciprocal_rank", "1 / rank of the candidate "
                                         "acted on", [*v, "action"], buckets=RR_BUCKETS,
                                         registry=r)
        # teacher agreement and drift: measured off the request path (serving.monitor)
        self.agreement_kl = Histogram(p + "agreement_kl", "KL(teacher soft label || "
                                      "student) over the shown candidates the teacher "
                                      "labelled", v, buckets=KL_BUCKETS, registry=r)
        self.agreement_ndcg = Histogram(p + "agreement_ndcg", "NDCG@10 of the student's "
                                        "order, teacher soft labels as gains", v,
                                        buckets=NDCG_BUCKETS, registry=r)
        self.agreement_skipped = Counter(p + "agreement_skipped_total", "Sampled requests "
                                         "not measured", ["reason"], registry=r)
        self.query_tokens = Counter(p + "query_tokens_total", "Subwords of ranked queries",
                                    v, registry=r)
        self.query_oov = Counter(p + "query_oov_tokens_total", "Query subwords outside the "
                                 "student's vocabulary", v, registry=r)
        self.drift_mmd = Gauge(p + "drift_mmd", "MMD^2 of recent query embeddings against "
                               "the bundle's training queries", v, registry=r)
        self.drift_state = Gauge(p + "drift_state", "1 while a detection is held",
                                 [*v, "signal"], registry=r)
        self.drift_events = Counter(p + "drift_events_total", "Drift detections",
                                    [*v, "signal"], registry=r)
        for reason in ("no_label", "no_overlap", "store_error", "queue_full"):
            self.agreement_skipped.labels(reason)
        self._info: dict[str, tuple[str, ...]] = {}

    def set_slot(self, version: str, slot: str, kind: str, teacher: str, precision: str) -> None:
        old = self._info.pop(version, None)
        if old is not None:
            self.model_info.remove(*old)
        labels = (version, slot, kind, teacher, precision)
        self.model_info.labels(*labels).set(1)
        for counter in (self.candidates, self.fallbacks, self.impressions, self.query_tokens,
                        self.query_oov):
            counter.labels(version)  # exported at 0 from the start: a rate() is 0, not absent
        self._info[version] = labels

    def labelled_versions(self) -> list[str]:
        return list(self._info)

    def holds(self, version: str) -> bool:
        return version in self._info

    def observe_feedback(self, version: str, action: str, position: int) -> None:
        """One action at a 1-based ``position`` of a list ``version`` served."""
        self.feedback.labels(version, action).inc()
        for k in FEEDBACK_K:
            if position <= k:
                self.feedback_at_k.labels(version, action, str(k)).inc()
        self.reciprocal_rank.labels(version, action).observe(1.0 / position)

    def forget(self, version: str) -> None:
        """Remove every series of an unloaded bundle."""
        old = self._info.pop(version, None)
        if old is not None:
            self.model_info.remove(*old)
        for metric in (self.rank_latency, self.candidates, self.fallbacks, self.impressions,
                       self.agreement_kl, self.agreement_ndcg, self.query_tokens,
                       self.query_oov, self.drift_mmd):
            with contextlib.suppress(KeyError):
                metric.remove(version)
        for metric in (self.feedback, self.feedback_at_k, self.reciprocal_rank,
                       self.drift_state, self.drift_events):
            metric.remove_by_labels({"model_version": version})
