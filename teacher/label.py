"""The nearline teacher labeller: soft labels and embeddings for what traffic brings.

``teacher precompute`` covers the data sets; live traffic brings new queries and
candidates. The labeller consumes the events topic as its own consumer group, asks
the store which impression queries lack a soft label and which shown candidates lack
an embedding in the pinned version, encodes those in batches and appends them. Why:

* **One label per query serves every list.** A record holds the query's embedding;
  its ``scores`` are the raw cosines to the candidates of the first list the query
  was shown with. For any other list a consumer computes ``logit_scale * cos(stored
  query embedding, stored candidate embeddings)``, so a query is encoded once.
* **Scores use the stored candidate embeddings**, read back after writing: the store
  keeps an id's first write (insert-if-absent), the vector every consumer sees.
* **At least once, idempotent.** Embeddings are written before the labels that use
  them, offsets committed after both; a batch replayed after a crash adds nothing.
* **Missing texts never stop it.** The server stores a fallback candidate's text
  before it emits the impression naming it, so one is rare: it is counted, looked up
  again on the next ``max_text_retries`` batches (its queries wait, in memory: a
  killed labeller forgets them) and then left out of those queries' records.
* A **lease** on the version (renewed every third of its TTL) keeps it from expiring
  under a running labeller; a killed one's lease runs out.
* **Invalid messages** are counted and skipped: the trainer's dead-letter queue owns them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from codistill.config import Settings
from stores.base import SoftLabelRecord, Store, VersionError, VersionInfo
from streaming.base import EventStream, GroupConsumer
from streaming.events import Feedback, Impression, InvalidEvent, parse_event
from teacher.model import Teacher

log = logging.getLogger("codistill.teacher.label")
PREFIX = "codistill_labeller_"


def check_version(store: Store, version: str) -> VersionInfo:
    """The manifest entry of ``version``; VersionError unless the store holds it complete
    (appends, numbered, go to complete versions; precompute is still writing others)."""
    info = store.get_version(version)
    if info is None:
        known = ", ".join(i.teacher_version for i in store.versions()) or "none"
        raise VersionError(f"{store.describe()} has no teacher version {version!r} (known: "
                           f"{known}); run `codistill teacher precompute` first")
    if info.status != "complete":
        raise VersionError(f"teacher version {version!r} in {store.describe()} is still "
                           "being written; label once `teacher precompute` completed it")
    return info


@dataclass
class LabelStats:
    """What one labeller did (the CLI's JSON summary)."""

    events: int = 0
    impressions: int = 0
    feedback: int = 0
    invalid: int = 0
    queries_labelled: int = 0
    queries_known: int = 0  # impression queries that had a label already (not encoded)
    candidates_embedded: int = 0
    missing_texts: int = 0  # failed text lookups (one candidate may fail several times)
    candidates_without_text: int = 0  # given up: left out of their queries' records
    seconds: float = 0.0
    caught_up: bool = False

    def summary(self) -> dict[str, Any]:
        s = max(self.seconds, 1e-9)
        return {**vars(self), "events_per_s": self.events / s,
                "candidates_per_s": self.candidates_embedded / s}


class LabellerMetrics:
    """Prometheus series of one labeller, on a registry of its own, labelled by version."""

    def __init__(self, version: str, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.version, v = version, ("teacher_version",)
        self.events = Counter(PREFIX + "events", "Records read, by kind (impression, "
                              "feedback, invalid)", (*v, "kind"), registry=r)
        for kind in ("impression", "feedback", "invalid"):
            self.events.labels(version, kind)

        def one(kind: type[Counter] | type[Gauge], name: str, doc: str) -> Any:
            return kind(PREFIX + name, doc, v, registry=r).labels(version)

        self.queries = one(Counter, "queries_labelled", "Soft-label records appended")
        self.candidates = one(Counter, "candidates_embedded", "Candidate embeddings appended")
        self.missing_text = one(Counter, "missing_text", "Candidate text lookups that found "
                                "no text in the store")
        self.lag_events = one(Gauge, "lag_events", "Sum over partitions of end offset minus "
                              "the group's committed offset")
        self.lag_seconds = one(Gauge, "lag_seconds", "Now minus the event time of the newest "
                               "impression labelled; 0 when caught up")
        self._server: Any = None

    def serve(self, port: int | None, host: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``port`` (None or 0: off)."""
        if port:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        """A sample's value, e.g. ``value("codistill_labeller_lag_events")``."""
        return self.registry.get_sample_value(name, {"teacher_version": self.version, **labels})

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class Labeller:
    """Label what the events topic shows and the store lacks (see the module docstring).

    Parameters
    ----------
    teacher, store
        The teacher whose version is labelled, and the store that holds it, complete.
    stream, topic
        The event log (offsets and commits, for the lag) and the events topic.
    group, consumer
        The consumer group (a restarted labeller resumes at its commits) and a group
        consumer of ``topic``; default ``stream.group_consumer(group, [topic])``.
    version
        Default ``teacher.version``; any other value is refused (its vectors would lie).
    batch_size, encode_batch, max_text_retries, lease_ttl_s
        See :class:`codistill.config.LabellerSettings`.
    metrics
        Default a new :class:`LabellerMetrics` (not served).
    """

    def __init__(self, teacher: Teacher, store: Store, stream: EventStream, topic: str, *,
                 group: str = "codistill-labeller", consumer: GroupConsumer | None = None,
                 version: str | None = None, batch_size: int = 256, encode_batch: int = 128,
                 max_text_retries: int = 5, lease_ttl_s: float = 120.0,
                 metrics: LabellerMetrics | None = None) -> None:
        self.version = version or teacher.version
        if self.version != teacher.version:
            raise ValueError(f"teacher {teacher.version} cannot label version {self.version!r}:"
                             " open that version's teacher")
        info = check_version(store, self.version)
        if info.dim != teacher.dim:
            raise VersionError(f"version {self.version!r} in {store.describe()} has dim "
                               f"{info.dim}, the teacher {teacher.dim}")
        self.teacher, self.store, self.stream, self.topic, self.group = (
            teacher, store, stream, topic, group)
        self.batch_size, self.encode_batch = batch_size, encode_batch
        self.max_text_retries, self.lease_ttl_s = max_text_retries, lease_ttl_s
        self.partitions = stream.partitions(topic)  # UnknownTopic before anything is held
        self.metrics = metrics or LabellerMetrics(self.version)
        self.stats = LabelStats()
        self.owner = f"teacher:labeller-{group}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._pending: dict[str, int] = {}  # candidate without text -> failed lookups
        self._waiting: dict[str, Impression] = {}  # queries whose list has a pending candidate
        self._stop, self._renewed = threading.Event(), -float("inf")
        self.consumer = consumer or stream.group_consumer(group, [topic])
        try:
            self._renew_lease()
            self.lag_events = self._measure_lag(None)
        except BaseException:
            self.consumer.close()
            raise

    # -- one batch -------------------------------------------------------------------------
    def step(self, timeout_s: float = 1.0) -> int:
        """Poll one batch, label what it lacks, commit; returns the records polled."""
        self._renew_lease()
        records = self.consumer.poll(timeout_s, self.batch_size)
        queries: dict[str, Impression] = {}
        candidates: dict[str, None] = {}
        newest: datetime | None = None
        for rec in records:
            try:
                event = parse_event(rec.value)
            except InvalidEvent:
                self._count("invalid")
                continue
            self._count(event.type)
            if isinstance(event, Feedback):
                continue
            candidates.update(dict.fromkeys(event.candidate_ids))
            queries.setdefault(event.query_id, event)  # its first list in the batch
            newest = event.event_time if newest is None else max(newest, event.event_time)
        if records:
            self._embed_candidates(list(candidates))
            self._label_queries(queries)
            self.consumer.commit()  # after the writes: a crash before it replays the batch
        self.lag_events = self._measure_lag(newest)
        return len(records)

    def _count(self, kind: str) -> None:
        self.stats.events += 1
        field = "impressions" if kind == "impression" else kind
        setattr(self.stats, field, getattr(self.stats, field) + 1)
        self.metrics.events.labels(self.version, kind).inc()

    def _embed_candidates(self, ids: list[str]) -> None:
        """Embed the batch's and the pending candidates the version lacks and has texts of."""
        check = list(dict.fromkeys([*ids, *self._pending]))
        if not check:
            return
        have = self.store.has_embeddings(self.version, check)
        missing = [c for c, ok in zip(check, have, strict=True) if not ok]
        texts = dict(zip(missing, self.store.get_texts(missing) if missing else [], strict=True))
        found = {c: t for c, t in texts.items() if t is not None}
        for c in [c for c in self._pending if c in found or c not in texts]:
            del self._pending[c]  # its text came, or someone else embedded it meanwhile
        for c in missing:
            if c not in found:
                self._no_text(c)
        order = list(found)
        for i in range(0, len(order), self.encode_batch):
            part = order[i : i + self.encode_batch]
            self._renew_lease()
            emb = self.teacher.encode([found[c] for c in part], desc="candidates")
            n = self.store.put_embeddings(self.version, part, emb)
            self.stats.candidates_embedded += n
            self.metrics.candidates.inc(n)

    def _no_text(self, cid: str) -> None:
        self.stats.missing_texts += 1
        self.metrics.missing_text.inc()
        tries = self._pending.get(cid, -1) + 1  # the first miss is no retry
        if tries < self.max_text_retries:
            self._pending[cid] = tries
            return
        self._pending.pop(cid, None)
        self.stats.candidates_without_text += 1
        log.warning("candidate %s has no text in %s after %d retries; labelling its queries "
                    "without it", cid, self.store.describe(), self.max_text_retries)

    def _label_queries(self, queries: dict[str, Impression]) -> None:
        """Label the batch's unlabelled queries and the waiting ones whose list is ready."""
        fresh = [q for q in queries.values() if q.query_id not in self._waiting]
        done = (self.store.has_labels(self.version, [q.query_id for q in fresh]) if fresh
                else np.zeros(0, dtype=bool))
        self.stats.queries_known += int(np.count_nonzero(done))
        todo = [*self._waiting.values(), *(q for q, d in zip(fresh, done, strict=True) if not d)]
        blocked = [any(c in self._pending for c in q.candidate_ids) for q in todo]
        self._waiting = {q.query_id: q for q, b in zip(todo, blocked, strict=True) if b}
        self._write_labels([q for q, b in zip(todo, blocked, strict=True) if not b])

    def _write_labels(self, queries: list[Impression]) -> None:
        for i in range(0, len(queries), self.encode_batch):
            part = queries[i : i + self.encode_batch]
            self._renew_lease()
            q_emb = self.teacher.encode([q.query for q in part], desc="queries")
            ids = list(dict.fromkeys(c for q in part for c in q.candidate_ids))
            emb, found = self.store.get_embeddings(self.version, ids)
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # fp16
            row = {c: j for j, c in enumerate(ids) if found[j]}
            records = []
            for q, qe in zip(part, q_emb, strict=True):
                keep = [c for c in q.candidate_ids if c in row]  # not: candidates without text
                scores = emb[[row[c] for c in keep]] @ qe if keep else np.zeros(0)
                records.append(SoftLabelRecord(
                    query_id=q.query_id, teacher_version=self.version, candidate_ids=keep,
                    scores=scores.astype(np.float32), query_embedding=qe,
                    logit_scale=self.teacher.logit_scale))
            n = self.store.put_labels(records)
            self.stats.queries_labelled += n
            self.metrics.queries.inc(n)

    def flush(self) -> None:
        """Give up on pending texts and label every waiting query with what it has."""
        self.stats.candidates_without_text += len(self._pending)
        self._pending.clear()
        waiting, self._waiting = list(self._waiting.values()), {}
        self._write_labels(waiting)

    # -- lag and lease ---------------------------------------------------------------------
    def _measure_lag(self, newest: datetime | None) -> int:
        """Events the group has not committed yet; updates both lag gauges."""
        lag = 0
        for p in self.partitions:
            committed = self.stream.committed(self.group, self.topic, p)
            if committed is None:
                committed = self.stream.start_offset(self.topic, p)
            lag += max(self.stream.end_offset(self.topic, p) - committed, 0)
        self.metrics.lag_events.set(lag)
        if lag == 0 or newest is not None:  # else: no impression since, keep the last value
            self.metrics.lag_seconds.set(0 if lag == 0 else
                                         max(time.time() - newest.timestamp(), 0.0))
        return lag

    def _renew_lease(self) -> None:
        """Renew once a third of the TTL passed (called per step and per encoded chunk)."""
        if time.monotonic() - self._renewed >= self.lease_ttl_s / 3:
            self.store.lease(self.version, self.owner, self.lease_ttl_s)
            self._renewed = time.monotonic()

    # -- running ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to stop after the batch in hand (signal-safe)."""
        self._stop.set()

    def run(self, follow: bool = False, max_idle_s: float | None = None,
            poll_s: float = 1.0) -> LabelStats:
        """Label until caught up (``follow`` False) or until :meth:`stop` / SIGINT / SIGTERM.

        Caught up: a poll found nothing and the group's commits reach the end offsets;
        ``max_idle_s`` stops it after that long without a record too (another group
        member's partitions never catch up here). The batch in hand is finished and
        committed, and the waiting queries are labelled (:meth:`flush`), before it returns.
        """
        restore = self._on_signals()
        start = idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.step(poll_s):
                    idle_since = time.monotonic()
                    continue
                if not follow and self.lag_events == 0:
                    self.stats.caught_up = True
                    break
                if max_idle_s is not None and time.monotonic() - idle_since >= max_idle_s:
                    break
            self.flush()
        finally:
            restore()
            self.stats.seconds += time.monotonic() - start
        return self.stats

    def _on_signals(self) -> Callable[[], None]:
        """SIGINT/SIGTERM call :meth:`stop` (main thread only); returns the undo."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {s: signal.signal(s, lambda *_: self.stop()) for s in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for s, handler in old.items():
                signal.signal(s, handler)

        return restore

    def close(self) -> None:
        """Close the consumer, stop serving metrics, release the lease (best effort)."""
        try:
            self.consumer.close()
            self.metrics.close()
        finally:
            try:
                self.store.release(self.version, self.owner)
            except Exception as exc:  # an unreachable store lets the lease run out instead
                log.warning("could not release the lease on %s: %s", self.version, exc)

    def __enter__(self) -> Labeller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_labeller(settings: Settings, version: str | None = None,
                  progress: bool = False) -> tuple[Labeller, Store, EventStream]:
    """The configured labeller (``settings.labeller``), its store and stream.

    ``version`` None: the store's current version, else the registry's current teacher.
    The store is checked before the teacher is loaded, so a wrong version fails fast.
    """
    from stores import open_configured_store
    from streaming import open_stream
    from teacher.workflow import ensure_current, open_teacher, resolve_version

    cfg = settings.labeller
    with ExitStack() as undo:  # on an error, close what was opened
        store = open_configured_store(settings)
        undo.callback(store.close)
        version = (resolve_version(settings, version) if version
                   else store.current() or ensure_current(settings))
        check_version(store, version)
        stream = open_stream(settings.resolved_stream())
        undo.callback(stream.close)
        labeller = Labeller(
            open_teacher(settings, version, progress), store, stream, settings.stream.topic,
            group=cfg.group, batch_size=cfg.batch_size, encode_batch=cfg.encode_batch,
            max_text_retries=cfg.max_text_retries, lease_ttl_s=cfg.lease_ttl_s)
        undo.callback(labeller.close)
        labeller.metrics.serve(cfg.metrics_port, cfg.metrics_host)
        undo.pop_all()
    return labeller, store, stream
