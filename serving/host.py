"""Which bundles a server holds, and the one safe way to change the serving one.

Triton-style model control: a bundle is loaded into a *new* ONNX Runtime session,
warmed and probed (finite outputs of the right shape, query encode within
``serving.probe_budget_ms``) before a single reference assignment makes it the
serving one. A request reads :attr:`ModelHost.serving` once and keeps that
:class:`Loaded` to the end, so in-flight requests finish on the model they started
with and no request ever sees a half-loaded model. The bundle swapped out stays
loaded as ``previous``, so a rollback is the same one assignment.

Every change (load, promote, rollback, refusal) is appended to an audit log, one JSON
object per line, and the registry's ``serving.json`` pointer follows, so a restart
serves what was serving.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.bundle import BundleError, BundleRegistry
from serving.runtime import GraphLevel, OnnxRanker
from serving.telemetry import ServingMetrics
from serving.vectors import VectorCache
from stores.base import CandidateStore


class NoPreviousBundle(BundleError):
    """A rollback with nothing to roll back to."""


@dataclass
class Loaded:
    """A warmed, probed bundle with the vector cache of its teacher version."""

    ranker: OnnxRanker
    vectors: VectorCache | None
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.ranker.version


class ModelHost:
    """The ``serving`` / ``candidate`` / ``previous`` slots of one server."""

    def __init__(self, registry: BundleRegistry, metrics: ServingMetrics,
                 store: CandidateStore | None, *, threads: int = 1,
                 graph_level: GraphLevel = "all", probe_budget_ms: float = 50.0,
                 cache_size: int = 100_000, audit_log: Path | None = None) -> None:
        self.registry, self.metrics, self.store = registry, metrics, store
        self.threads, self.graph_level = threads, graph_level
        self.probe_budget_ms, self.cache_size = probe_budget_ms, cache_size
        self.audit_log = audit_log
        self.serving: Loaded | None = None
        self.previous: Loaded | None = None
        self.candidate: Loaded | None = None
        self._lock = threading.Lock()  # one change at a time; requests never take it
        self._caches: dict[str, VectorCache] = {}

    # -- loading -----------------------------------------------------------------------
    def _cache_for(self, teacher_version: str) -> VectorCache:
        cache = self._caches.get(teacher_version)
        if cache is None:
            cache = self._caches[teacher_version] = VectorCache(self.store, teacher_version,
                                                                self.cache_size)
        return cache

    def _held(self, version: str) -> Loaded | None:
        for slot in (self.serving, self.candidate, self.previous):
            if slot is not None and slot.version == version:
                return slot
        return None

    def _open(self, version: str) -> Loaded:
        held = self._held(version)
        if held is not None:
            return held
        try:
            ranker = OnnxRanker.load(self.registry, version, self.threads, self.graph_level)
            ranker.warm()
            probe = ranker.probe(self.probe_budget_ms)
        except BundleError as exc:
            self.metrics.load_failures.labels("open").inc()
            self._audit("load", version, ok=False, detail=str(exc))
            raise
        if not probe.ok:
            self.metrics.load_failures.labels("probe").inc()
            self._audit("load", version, ok=False, detail=probe.reason)
            raise BundleError(f"bundle {version} failed its probe: {probe.reason}")
        card = ranker.card
        vectors = None if card.has_candidate_tower else self._cache_for(card.teacher_version)
        return Loaded(ranker, vectors)

    def _label(self) -> None:
        """Model-info series for exactly the bundles held; every other version forgotten."""
        held: dict[str, tuple[str, Loaded]] = {}
        for slot, lo in (("serving", self.serving), ("previous", self.previous),
                         ("candidate", self.candidate)):
            if lo is not None and lo.version not in held:
                held[lo.version] = (slot, lo)
        for version in self.metrics.labelled_versions():
            if version not in held:
                self.metrics.forget(version)
        for version, (slot, lo) in held.items():
            c = lo.ranker.card
            self.metrics.set_slot(version, slot, c.kind, c.teacher_version, c.precision)

    def load(self, version: str) -> Loaded:
        """Load ``version`` into the ``candidate`` slot (verified, warmed, probed)."""
        with self._lock:
            lo = self._open(version)
            if lo is not self.serving:
                self.candidate = lo
            self._label()
            self._audit("load", version, ok=True)
            return lo

    def promote(self, version: str, reason: str = "admin") -> Loaded:
        """Make ``version`` the serving bundle; the old one becomes ``previous``."""
        with self._lock:
            lo = self._open(version)
            if lo is self.serving:
                return lo
            old = self.serving
            self.serving = lo  # the swap: one reference assignment
            if old is not None:
                self.previous = old
            if self.candidate is lo:
                self.candidate = None
            self.registry.set_serving(version)
            self.metrics.swaps.inc()
            if old is not None:
                self.metrics.promotions.inc()
            self._label()
            self._audit("promote", version, ok=True, detail=reason,
                        replaced=old.version if old else None)
            return lo

    def rollback(self) -> Loaded:
        """Serve ``previous`` again (the current one becomes ``previous``)."""
        with self._lock:
            if self.previous is None:
                raise NoPreviousBundle("no previous bundle to roll back to")
            old, self.serving, self.previous = self.serving, self.previous, self.serving
            assert self.serving is not None
            self.registry.set_serving(self.serving.version)
            self.metrics.swaps.inc()
            self.metrics.rollbacks.inc()
            self._label()
            self._audit("rollback", self.serving.version, ok=True,
                        replaced=old.version if old else None)
            return self.serving

    def slots(self) -> dict[str, str | None]:
        return {name: (lo.version if lo else None) for name, lo in
                (("serving", self.serving), ("candidate", self.candidate),
                 ("previous", self.previous))}

    # -- audit ---------------------------------------------------------------------------
    def _audit(self, action: str, version: str, ok: bool, **extra: Any) -> None:
        if self.audit_log is None:
            return
        entry = {"time": datetime.now(UTC).isoformat(), "action": action, "version": version,
                 "ok": ok, **extra}
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        with self.audit_log.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
