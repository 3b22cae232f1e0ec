"""Event stream interfaces shared by the embedded log and Kafka.

The online trainer must apply every event batch exactly once across crashes. It
does so by checkpointing (weights, next offset per partition, join state)
atomically and committing group offsets only afterwards; on restart it resumes
from its checkpoint. That needs *deterministic* reads - the same
``(partition, start_offset, max_records)`` always yields the same records - which
:class:`EventReader` provides. Ordinary consumers (the DLQ inspector, dashboards)
use a :class:`GroupConsumer` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class StreamError(RuntimeError):
    """Base class for stream failures."""


class StreamUnavailable(StreamError):
    """The backend cannot be reached (the message names the address). Callers may retry."""


class LogCorruption(StreamError):
    """A log holds a bad record *before* its durable end: data that was synced is damaged.

    Not a torn tail (those lie past the durable end and are repaired automatically).
    Nothing past ``position`` is served or appended until an explicit repair
    (``codistill events repair``), which truncates the log there.
    """

    def __init__(self, path: object, position: int, offset: int, detail: str) -> None:
        super().__init__(
            f"{path}: corrupt record at byte {position} (offset {offset}): {detail}; nothing "
            "past it is served. `codistill events repair` truncates the log there (the "
            "records after it are lost); restore the file from a backup to keep them"
        )
        self.path, self.position, self.offset = path, position, offset


class OffsetOutOfRange(StreamError):
    """A read asked for an offset below the partition's log start (a removed prefix).

    Raised rather than served from the start (Kafka's ``auto_offset_reset``): a
    reader by offset that silently got later records would renumber every batch
    after it. ``start`` is the first offset still held.
    """

    def __init__(self, topic: str, partition: int, offset: int, start: int, where: str = ""
                 ) -> None:
        super().__init__(
            f"{topic}[{partition}]{where}: offset {offset} is out of range, below the log start "
            f"{start}: "
            f"records [{offset}, {start}) were removed (retention or delete_records)")
        self.topic, self.partition, self.offset, self.start = topic, partition, offset, start


class UnknownTopic(StreamError):
    """The topic does not exist (create it with ``create_topic`` / ``ensure_topics``)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One message as stored: where it is, its key, its raw value and its append time."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    timestamp_ms: int


@runtime_checkable
class EventProducer(Protocol):
    def send(self, topic: str, key: str, value: bytes) -> None:
        """Queue one message; the key picks the partition (murmur2, like Kafka)."""
        ...

    def flush(self) -> None:
        """Block until every queued message is durably appended (raises on failure)."""
        ...


@runtime_checkable
class EventReader(Protocol):
    def partitions(self, topic: str) -> list[int]: ...

    def read(self, topic: str, partition: int, start_offset: int, max_records: int) -> list[Record]:
        """Up to ``max_records`` records starting exactly at ``start_offset``, in offset order.

        Fewer (possibly none) when the rest is not available yet; never a gap.
        """
        ...

    def end_offset(self, topic: str, partition: int) -> int:
        """Offset the next appended record will get (= records so far for the embedded log)."""
        ...

    def start_offset(self, topic: str, partition: int) -> int:
        """The log start: the first offset still held (0 until a prefix was removed).

        Offsets never shift when a prefix goes; a read below the start raises
        :class:`OffsetOutOfRange`.
        """
        ...

    def committed(self, group: str, topic: str, partition: int) -> int | None:
        """The group's committed *next* offset, or None if it never committed."""
        ...

    def commit(self, group: str, topic: str, offsets: Mapping[int, int]) -> None:
        """Store ``{partition: next_offset}`` for the group (atomically for the embedded log)."""
        ...


@runtime_checkable
class GroupConsumer(Protocol):
    """A subscribed consumer with manual commits: at least once, resumes at its commits."""

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Record]: ...

    def commit(self) -> None:
        """Commit the position after the last record returned by :meth:`poll`."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class EventStream(EventProducer, EventReader, Protocol):
    """Everything one backend provides; what ``streaming.open_stream(settings)`` returns."""

    def create_topic(self, topic: str, partitions: int) -> None:
        """Create a topic; idempotent (an existing topic keeps its partition count)."""
        ...

    def ensure_topics(self) -> None:
        """Create the configured events and dead-letter topics if missing."""
        ...

    def group_consumer(self, group: str, topics: list[str]) -> GroupConsumer: ...

    def describe(self) -> str:
        """Human-readable location, e.g. ``kafka://127.0.0.1:9092``."""
        ...

    def close(self) -> None: ...
