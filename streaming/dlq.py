"""Dead letters: invalid messages are set aside with their reason, never crash a consumer.

A rejected message goes to the DLQ topic as a JSON envelope holding the raw
bytes (base64, since they may not be text), the reason and where it came from,
so it can be inspected and replayed after a fix. The Prometheus counter
``codistill_dlq_events_total{reason}`` is labelled with the *rejection code*
(``bad_json``, ``schema``, ``unsupported_version``, ``unknown_candidate``), a
small fixed set; the free-text reason goes in the envelope only, because label
values must not be unbounded.

Schema versions 1 and 2 are validated alike (:mod:`streaming.events`), except that
the candidate-store check skips a v2 impression's ``unknown_candidate_ids``: the
server declared it ranked them without a teacher vector, so their absence from the
store is expected, not a bad message. Its other candidates are still checked.
"""

from __future__ import annotations

import base64
import json
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from streaming.base import EventProducer, Record
from streaming.events import UNKNOWN_CANDIDATE, Event, Impression, InvalidEvent, parse_event

KnownCandidates = Callable[[list[str]], "np.ndarray | Sequence[bool]"]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message was not accepted: a stable ``code`` and a readable ``reason``."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A decoded DLQ message."""

    code: str
    reason: str
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    time: str
    raw: bytes


def validate(record: Record | bytes, known_candidates: KnownCandidates | None = None
             ) -> Event | Rejection:
    """Parse a message and check its candidate ids against the candidate store.

    Returns the event, or a :class:`Rejection` for invalid input (never raises for
    it). ``known_candidates(ids) -> mask`` is the store lookup (never called with
    no ids); a failure *of the store* propagates, because a store outage must not
    send valid events to the DLQ. Ids an impression declares in
    ``unknown_candidate_ids`` are not looked up, nor is the candidate of feedback
    that says ``unknown_candidate`` (the server echoes its impression's declaration).
    """
    raw = record.value if isinstance(record, Record) else record
    try:
        event = parse_event(raw)
    except InvalidEvent as exc:
        return Rejection(exc.code, exc.reason)
    if known_candidates is not None:
        if isinstance(event, Impression):
            declared = set(event.unknown_candidate_ids)
            ids = [c for c in event.candidate_ids if c not in declared]
        else:
            ids = [] if event.unknown_candidate else [event.candidate_id]
        if not ids:
            return event
        mask = np.asarray(known_candidates(list(ids)), dtype=bool)
        if mask.shape != (len(ids),):
            raise ValueError(f"known_candidates returned shape {mask.shape} for {len(ids)} ids")
        if not mask.all():
            unknown = [i for i, ok in zip(ids, mask, strict=True) if not ok]
            field = "candidate_ids" if isinstance(event, Impression) else "candidate_id"
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            return Rejection(UNKNOWN_CANDIDATE,
                             f"field '{field}': unknown to the candidate store: {shown}")
    return event


_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()
_COUNTERS_LOCK = threading.Lock()


def dlq_counter(registry: CollectorRegistry | None = None) -> Counter:
    """The DLQ counter of ``registry`` (default: the global one), created once per registry."""
    registry = REGISTRY if registry is None else registry
    with _COUNTERS_LOCK:
        counter = _COUNTERS.get(registry)
        if counter is None:
            counter = _COUNTERS[registry] = Counter(
                "codistill_dlq_events", "Messages sent to the dead-letter queue, by rejection code",
                ["reason"], registry=registry,
            )
        return counter


class DeadLetterQueue:
    """Sends rejected messages to the DLQ topic and counts them."""

    def __init__(self, producer: EventProducer, topic: str,
                 registry: CollectorRegistry | None = None) -> None:
        self.producer, self.topic = producer, topic
        self.counter = dlq_counter(registry)

    def send(self, raw: bytes, rejection: Rejection, source: Record | None = None) -> None:
        envelope = {
            "code": rejection.code,
            "reason": rejection.reason,
            "source": None if source is None else {
                "topic": source.topic, "partition": source.partition, "offset": source.offset,
            },
            "time": datetime.now(UTC).isoformat(),
            "raw_b64": base64.b64encode(raw).decode("ascii"),
        }
        # Keyed by source position: one partition per origin, and replays are traceable.
        key = "-" if source is None else f"{source.topic}/{source.partition}/{source.offset}"
        self.producer.send(self.topic, key, json.dumps(envelope).encode("utf-8"))
        self.counter.labels(reason=rejection.code).inc()

    def check(self, record: Record, known_candidates: KnownCandidates | None = None
              ) -> Event | None:
        """The consumer-path filter: the event if valid, else dead-letter it and return None."""
        result = validate(record, known_candidates)
        if isinstance(result, Rejection):
            self.send(record.value, result, record)
            return None
        return result


def decode_dead_letter(value: bytes) -> DeadLetter:
    """Read back a DLQ message (for inspectors and tests)."""
    env = json.loads(value)
    src = env.get("source") or {}
    return DeadLetter(env["code"], env["reason"], src.get("topic"), src.get("partition"),
                      src.get("offset"), env["time"], base64.b64decode(env["raw_b64"]))
