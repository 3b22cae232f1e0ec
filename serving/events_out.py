"""Impressions and feedback to the event log, off the request path.

A request never waits for the broker: ``/v1/rank`` puts its impression on a bounded
queue and returns. One worker thread stores the texts of fallback candidates
(``put_texts``, so the teacher can embed them later) *before* it sends the
impression that names them, then sends. When the queue is full the event is
dropped and counted (``events_dropped_total{reason="queue_full"}``); when the broker
or the store fails the worker retries with capped exponential back-off while the
queue absorbs traffic, so an outage shows as queue depth, then drops, never as a
failed ``/v1/rank``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from serving.telemetry import ServingMetrics
from stores.base import CandidateStore, StoreError
from streaming.base import EventProducer, StreamError
from streaming.events import Event


@dataclass
class Outgoing:
    event: Event
    texts: Mapping[str, str] = field(default_factory=dict)  # put_texts before sending


class EventSink:
    """Bounded queue + one writer thread.

    Parameters
    ----------
    producer : EventProducer or None
        The event log; ``None`` disables events (they are counted as dropped).
    topic : str
        Events topic (keyed by request id, like every producer of the project).
    store : CandidateStore or None
        Where fallback candidates' texts go.
    capacity : int
        Events waiting at most.
    retry_for_s : float
        How long one event is retried before it is dropped (``reason="broker"`` or
        ``"store"``).
    """

    def __init__(self, producer: EventProducer | None, topic: str, metrics: ServingMetrics,
                 store: CandidateStore | None = None, capacity: int = 10_000,
                 retry_for_s: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> None:
        self.producer, self.topic, self.metrics, self.store = producer, topic, metrics, store
        self.retry_for_s, self._sleep = retry_for_s, sleep
        self._q: queue.Queue[Outgoing | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="event-sink", daemon=True)
        self._stopping = threading.Event()
        self.broker_ok = True
        self._thread.start()

    def submit(self, item: Outgoing) -> bool:
        """Queue an event; False (and counted) if the queue is full or events are off."""
        if self.producer is None:
            self.metrics.events_dropped.labels("disabled").inc()
            return False
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self.metrics.events_dropped.labels("queue_full").inc()
            return False
        self.metrics.queue_depth.set(self._q.qsize())
        return True

    def _retry(self, what: str, fn: Callable[[], None]) -> bool:
        deadline, delay = time.monotonic() + self.retry_for_s, 0.05
        while True:
            try:
                fn()
                if what == "broker":
                    self.broker_ok = True
                return True
            except (StreamError, StoreError, OSError) as exc:
                if what == "broker":
                    self.broker_ok = False
                    self.metrics.broker_errors.inc()
                else:
                    self.metrics.store_errors.labels("put_texts").inc()
                if time.monotonic() >= deadline or self._stopping.is_set():
                    self.metrics.events_dropped.labels(what).inc()
                    self.last_error = repr(exc)
                    return False
                self._sleep(delay)
                delay = min(delay * 2, 2.0)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            self.metrics.queue_depth.set(self._q.qsize())
            try:
                if item is None:
                    return
                self._write(item)
            finally:
                self._q.task_done()

    def _write(self, item: Outgoing) -> None:
        if item.texts and self.store is not None:
            texts, store = dict(item.texts), self.store
            if not self._retry("store", lambda: store.put_texts(texts)):
                return  # never name a candidate whose text was not stored
        event, producer = item.event, self.producer
        assert producer is not None
        if self._retry("broker", lambda: producer.send(self.topic, event.request_id,
                                                       event.to_bytes())):
            self.metrics.events.labels(event.type).inc()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued event was handled and the producer flushed."""
        deadline = time.monotonic() + timeout_s
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.producer is not None:
            try:
                self.producer.flush()
            except (StreamError, OSError):
                return False
        return not self._q.unfinished_tasks

    def close(self, timeout_s: float = 10.0) -> None:
        self.flush(timeout_s)
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        self._thread.join(timeout_s)
