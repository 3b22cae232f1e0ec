"""Interaction events and the stream they travel on (embedded log or Kafka).

``open_stream(settings)`` picks the backend from ``StreamSettings.backend``.
Readers accept every version in ``SUPPORTED_SCHEMA_VERSIONS`` (1 and 2, see
:mod:`streaming.events`); writers emit 1 unless asked for 2, so a new version is
read everywhere before anything writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from streaming.base import (
    EventProducer,
    EventReader,
    EventStream,
    GroupConsumer,
    Record,
    StreamError,
    StreamUnavailable,
    UnknownTopic,
)
from streaming.events import (
    SUPPORTED_SCHEMA_VERSIONS,
    Event,
    Feedback,
    Impression,
    InvalidEvent,
    parse_event,
)
from streaming.partitioner import partition_for

if TYPE_CHECKING:
    from codistill.config import StreamSettings

__all__ = [
    "SUPPORTED_SCHEMA_VERSIONS",
    "Event",
    "EventProducer",
    "EventReader",
    "EventStream",
    "Feedback",
    "GroupConsumer",
    "Impression",
    "InvalidEvent",
    "Record",
    "StreamError",
    "StreamUnavailable",
    "UnknownTopic",
    "open_stream",
    "parse_event",
    "partition_for",
]


def open_stream(settings: StreamSettings) -> EventStream:
    """The configured backend; the Kafka client is imported only when it is used.

    An unset embedded ``path`` means ``artifacts/events`` (the default ``HOME/events``);
    pass ``Settings.resolved_stream()`` to honour another home.
    """
    if settings.backend == "embedded":
        from streaming.embedded import EmbeddedStream

        path = settings.path if settings.path is not None else Path("artifacts") / "events"
        return EmbeddedStream(path, settings.topic, settings.dlq_topic, settings.partitions)
    if settings.backend == "kafka":
        from streaming.kafka import KafkaStream

        return KafkaStream(settings)
    raise ValueError(f"unknown stream backend {settings.backend!r}")
