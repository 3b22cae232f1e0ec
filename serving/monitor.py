"""Quality and drift of the serving student, measured off the request path.

``/v1/rank`` hands each answered request to :meth:`QualityMonitor.submit` (a
non-blocking put on a bounded queue; a full queue skips the request and counts it).
One background thread then, per model version:

* feeds the *input* signals to a detector each: the query's out-of-vocabulary share
  (``oov_share``) and the share of candidates without a teacher vector
  (``unknown_candidates``);
* keeps the last ``mmd_window`` *distinct* queries' embeddings (a popular query
  repeated would weigh a window towards itself; the reference holds distinct training
  queries too) and every ``mmd_every`` queries sets ``drift_mmd``: MMD² of that window
  against the bundle's training-query reference (``drift-reference.npy``, written at
  export). The kernel width is the reference's median pairwise distance, fixed per
  bundle so values compare over time. That level says how far traffic is from the
  training queries - held-out packages alone sit well above 0 - so the
  ``query_embedding`` *detection* asks a different question: has traffic changed?
  Each window is tested against a baseline window of the same version's earlier
  traffic (the first full window; after a detection, the window that caused it) by
  permutation, and the detector reads ``1 - p``: near uniform on [0, 1] while traffic
  is unchanged, near 1 once it has moved. Why not the detector on MMD² itself: ADWIN's
  bound assumes values spread over [0, 1] and Page-Hinkley's default threshold sums to
  50, so on MMD² values near 0.03 neither flagged a measured jump to 0.075 within 900
  queries; on ``1 - p`` ADWIN flagged the same switch 15 windows after it and nothing
  in 3,000 queries before it (4 seeds, the stack's small home);
* for a sampled share of requests (``agreement_sample``) reads the query's teacher
  soft label and records KL(teacher ‖ student) and NDCG@10 of the student's order
  against it, over the shown candidates the teacher labelled; the KL feeds the
  ``agreement_kl`` detector.

Why a thread and not the request: the label read is a store round trip and MMD is
O(window x reference) work, neither of which a ranking request should wait for. The
detectors are :class:`codistill.drift.Detector` (river), the same as the trainer's
naming scheme: ``drift_state{signal}`` and ``drift_events_total{signal}``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from codistill.config import MonitorSettings
from codistill.drift import Detector, median_bandwidth, mmd2, mmd_test
from codistill.metrics import ndcg_at_k
from serving.telemetry import ServingMetrics
from stores.base import LabelStore, StoreError

log = logging.getLogger("codistill.serving.monitor")
SIGNALS = ("oov_share", "unknown_candidates", "query_embedding", "agreement_kl")


@dataclass(frozen=True)
class Observation:
    """What one answered ``/v1/rank`` request tells the monitor."""

    version: str
    teacher_version: str
    query_id: str
    query_vec: np.ndarray
    candidate_ids: tuple[str, ...]
    scores: np.ndarray  # the student's logits, aligned with candidate_ids
    oov_share: float
    unknown_share: float
    reference: Path | None = None  # the bundle's drift reference, if it has one


@dataclass
class _Version:
    detectors: dict[str, Detector]
    reference: np.ndarray | None = None
    bandwidth: float = 1.0
    window: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)
    baseline: np.ndarray | None = None
    since_mmd: int = 0


def agreement(student_logits: np.ndarray, teacher_logits: np.ndarray, k: int = 10
              ) -> tuple[float, float]:
    """KL(teacher ‖ student) of the two softmaxes and NDCG@k of the student's order.

    Both logit vectors cover the same candidates; the teacher's softmax is the gain.

    >>> kl, ndcg = agreement(np.array([3.0, 1.0, 0.0]), np.array([3.0, 1.0, 0.0]))
    >>> round(kl, 6), round(ndcg, 6)
    (0.0, 1.0)
    >>> kl, ndcg = agreement(np.array([0.0, 1.0, 3.0]), np.array([3.0, 1.0, 0.0]))
    >>> kl > 1.0, ndcg < 0.8
    (True, True)
    """
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max()
        return x - np.log(np.exp(x).sum())

    lt, ls = log_softmax(teacher_logits), log_softmax(student_logits)
    pt = np.exp(lt)
    kl = float((pt * (lt - ls)).sum())
    return max(kl, 0.0), ndcg_at_k(student_logits, pt, k)  # type: ignore[arg-type]


class QualityMonitor:
    """The background half of the server's quality and drift metrics.

    Parameters
    ----------
    cfg
        ``serving.monitor``.
    metrics
        The server's metrics (series are written only for versions it holds).
    labels
        Where teacher soft labels are read (the server's store); None: no agreement.
    seed
        Seeds the agreement sampling.
    """

    def __init__(self, cfg: MonitorSettings, metrics: ServingMetrics,
                 labels: LabelStore | None, seed: int = 0) -> None:
        self.cfg, self.metrics, self.labels = cfg, metrics, labels
        self._rng = random.Random(seed)
        self._queue: queue.Queue[Observation | None] = queue.Queue(cfg.queue)
        self._versions: dict[str, _Version] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.processed = 0

    # -- the request side --------------------------------------------------------------
    def submit(self, obs: Observation) -> bool:
        """Queue one request; False (counted as ``queue_full``) if the monitor lags."""
        try:
            self._queue.put_nowait(obs)
            return True
        except queue.Full:
            self.metrics.agreement_skipped.labels("queue_full").inc()
            return False

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> QualityMonitor:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="quality-monitor",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=timeout_s)
            self._thread.join(timeout_s)
            self._thread = None

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until everything submitted so far is processed (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        while True:
            obs = self._queue.get()
            try:
                if obs is None:
                    return
                self.process(obs)
            except Exception:  # a monitor bug must never take the server down
                log.exception("quality monitor failed on one request")
            finally:
                self._queue.task_done()

    # -- the work ----------------------------------------------------------------------
    def _state(self, obs: Observation) -> _Version:
        state = self._versions.get(obs.version)
        if state is None:
            c = self.cfg
            state = _Version({s: Detector(c.detector, c.delta, c.hold_s,
                                          clock=1 if s == "query_embedding" else 32)
                              for s in SIGNALS})
            if obs.reference is not None and obs.reference.is_file():
                state.reference = np.load(obs.reference).astype(np.float32)
                state.bandwidth = median_bandwidth(state.reference)
            for s in SIGNALS:
                self.metrics.drift_state.labels(obs.version, s).set(0)
                self.metrics.drift_events.labels(obs.version, s)
            self._versions[obs.version] = state
        return state

    def _feed(self, version: str, state: _Version, signal: str, value: float) -> None:
        if state.detectors[signal].update(value):
            self.metrics.drift_events.labels(version, signal).inc()
            log.warning("drift in %s of %s (detector %s)", signal, version, self.cfg.detector)
        self.metrics.drift_state.labels(version, signal).set(
            int(state.detectors[signal].in_drift()))

    def process(self, obs: Observation) -> None:
        """Update every signal with one request (the monitor thread calls this)."""
        with self._lock:
            if not self.metrics.holds(obs.version):
                return  # unloaded meanwhile: its series are gone and must stay gone
            state = self._state(obs)
            v = obs.version
            self._feed(v, state, "oov_share", obs.oov_share)
            self._feed(v, state, "unknown_candidates", obs.unknown_share)
            if state.reference is not None:
                self._embedding(v, state, obs)
            self.processed += 1
        if self.labels is not None and self._rng.random() < self.cfg.agreement_sample:
            self._agreement(obs, state)

    def _embedding(self, v: str, state: _Version, obs: Observation) -> None:
        c, window = self.cfg, state.window
        window.pop(obs.query_id, None)
        window[obs.query_id] = obs.query_vec
        while len(window) > c.mmd_window:
            window.popitem(last=False)
        state.since_mmd += 1
        if len(window) < c.mmd_window or state.since_mmd < c.mmd_every:
            return
        state.since_mmd = 0
        recent = np.stack(list(window.values()))
        assert state.reference is not None
        self.metrics.drift_mmd.labels(v).set(mmd2(recent, state.reference, state.bandwidth))
        if state.baseline is None:
            state.baseline = recent
            return
        _, p = mmd_test(recent, state.baseline, state.bandwidth, c.mmd_permutations,
                        seed=self.processed)
        events = state.detectors["query_embedding"].detections
        self._feed(v, state, "query_embedding", 1.0 - p)
        if state.detectors["query_embedding"].detections > events:
            state.baseline = recent  # the new normal: a return would be a change too

    def _agreement(self, obs: Observation, state: _Version) -> None:
        m = self.metrics
        try:
            rec = self.labels.get_labels(obs.teacher_version, [obs.query_id])[0]  # type: ignore[union-attr]
        except StoreError:
            m.agreement_skipped.labels("store_error").inc()
            return
        if rec is None:
            m.agreement_skipped.labels("no_label").inc()
            return
        where = {c: i for i, c in enumerate(obs.candidate_ids)}
        pairs = [(where[c], j) for j, c in enumerate(rec.candidate_ids) if c in where]
        if len(pairs) < 2:
            m.agreement_skipped.labels("no_overlap").inc()
            return
        mine, theirs = (np.array(x) for x in zip(*pairs, strict=True))
        kl, ndcg = agreement(obs.scores[mine], rec.logit_scale * rec.scores[theirs])
        with self._lock:
            if not m.holds(obs.version):
                return
            m.agreement_kl.labels(obs.version).observe(kl)
            m.agreement_ndcg.labels(obs.version).observe(ndcg)
            self._feed(obs.version, state, "agreement_kl", kl)

    def refresh(self) -> None:
        """Drop forgotten versions; let held drift states expire (called on each scrape)."""
        with self._lock:
            for version in list(self._versions):
                if not self.metrics.holds(version):
                    del self._versions[version]
                    self.metrics.forget(version)  # series a late update re-created
                    continue
                for s, d in self._versions[version].detectors.items():
                    self.metrics.drift_state.labels(version, s).set(int(d.in_drift()))
