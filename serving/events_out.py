"""Impressions and feedback to the event log, off the request path.

A request never waits for the broker: ``/v1/rank`` puts its impression on a bounded
queue and returns. One worker thread takes what is queued (up to ``max_batch``
events), stores the texts of fallback candidates (``put_texts``, so the teacher can
embed them later) *before* it sends the impression that names them, sends, and then
flushes the producer: an event is counted as written (``events_total``) only once
the log confirmed it. A Kafka producer accepts sends into its own buffer while the
broker is gone and delivers them when it is back (or fails them after its delivery
timeout), so a send that returns proves nothing; the flush does. While a flush goes
unanswered the worker counts a broker error every ``ack_timeout_s`` and takes no new
events, so the outage shows as broker errors, queue depth, then drops
(``events_dropped_total{reason="queue_full"}``), never as a failed ``/v1/rank``.
When a send or a store write raises, the worker retries with capped exponential
back-off for ``retry_for_s``, then drops (``reason="broker"`` / ``"store"``); a batch
whose flush fails is dropped with ``reason="broker"`` (the producer protocol does not
say which of its records failed; against a broker that is down, all of them). So
after an outage the events on the log are the ``events_total`` ones, and
``events_total`` plus the drops is what was submitted.
"""

from __future__ import annotations

import contextlib
import functools
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
    ack_timeout_s : float
        A flush unanswered this long counts one broker error (and one more each
        further ``ack_timeout_s``); the worker keeps waiting for the producer's verdict.
    max_batch : int
        Events sent before one flush.
    """

    def __init__(self, producer: EventProducer | None, topic: str, metrics: ServingMetrics,
                 store: CandidateStore | None = None, capacity: int = 10_000,
                 retry_for_s: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 ack_timeout_s: float = 2.0, max_batch: int = 500) -> None:
        self.producer, self.topic, self.metrics, self.store = producer, topic, metrics, store
        self.retry_for_s, self._sleep = retry_for_s, sleep
        self.ack_timeout_s, self.max_batch = ack_timeout_s, max_batch
        self.last_error: str | None = None
        self._q: queue.Queue[Outgoing | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="event-sink", daemon=True)
        self._stopping = threading.Event()
        self.broker_ok = True
        self._thread.start()

    def depth(self) -> int:
        """Events waiting in the queue."""
        return self._q.qsize()

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
            batch = [self._q.get()]
            while len(batch) < self.max_batch and batch[-1] is not None:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            self.metrics.queue_depth.set(self._q.qsize())
            try:
                items = [item for item in batch if item is not None]
                if items:
                    self._write(items)
                if batch[-1] is None:
                    return
            finally:
                for _ in batch:
                    self._q.task_done()

    def _write(self, items: list[Outgoing]) -> None:
        producer = self.producer
        assert producer is not None
        sent: list[Event] = []
        for item in items:
            if item.texts and self.store is not None:
                put = functools.partial(self.store.put_texts, dict(item.texts))
                if not self._retry("store", put):
                    continue  # never name a candidate whose text was not stored
            event = item.event
            send = functools.partial(producer.send, self.topic, event.request_id,
                                     event.to_bytes())
            if self._retry("broker", send):
                sent.append(event)
        if sent:
            self._confirm(producer, sent)

    def _confirm(self, producer: EventProducer, sent: list[Event]) -> None:
        """Flush, waiting as long as the producer takes; count the batch by its verdict."""
        done, failure = threading.Event(), []

        def flush() -> None:
            try:
                producer.flush()
            except (StreamError, OSError) as exc:
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=flush, name="event-sink-flush", daemon=True).start()
        while not done.wait(self.ack_timeout_s):
            self.broker_ok = False  # unanswered: the broker is away (the producer retries)
            self.metrics.broker_errors.inc()
            if self._stopping.is_set():
                failure.append(TimeoutError("closed while the flush was unanswered"))
                break
        if failure:
            self.broker_ok = False
            self.metrics.broker_errors.inc()
            self.metrics.events_dropped.labels("broker").inc(len(sent))
            self.last_error = repr(failure[0])
            return
        self.broker_ok = True
        for event in sent:
            self.metrics.events.labels(event.type).inc()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued event was handled (written or dropped) and flushed.

        False after ``timeout_s`` with events still waiting (the producer is then not
        flushed here: against a broker that is away that would wait for the
        producer's delivery timeout, not ``timeout_s``).
        """
        deadline = time.monotonic() + timeout_s
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        if self._q.unfinished_tasks:
            return False
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
