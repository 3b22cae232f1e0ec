"""Kafka backend (kafka-python).

Producer: ``acks="all"``, ``linger_ms=5`` and idempotence, so a retried batch is
not duplicated and per-key order survives retries; keys are hashed with the
client's default murmur2 partitioner (same as :func:`streaming.partition_for`).

Reader: a ``KafkaConsumer`` in **manual assignment** mode (``assign`` + ``seek``),
not a subscription. The online trainer is the single consumer of its group and
its *checkpoint* decides where it resumes; a group rebalance would move
positions behind its back and break "apply each batch exactly once". Group
offsets are still stored in Kafka: :meth:`KafkaStream.commit` / ``committed`` use
one assign-mode consumer per group id (``group_id`` set, never subscribed), so
the group coordinator records them and lag monitoring keeps working. Such a
commit carries no generation; the broker accepts it only while the group has
no subscribed members, which is the case for a trainer-owned group.

Ordinary consumers (the DLQ inspector) use :class:`KafkaGroupConsumer`:
``subscribe`` with manual commits and a short session timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    TopicAlreadyExistsError,
)
from kafka.structs import OffsetAndMetadata

from codistill.config import StreamSettings
from streaming.base import OffsetOutOfRange, Record, StreamError, StreamUnavailable, UnknownTopic

_UNREACHABLE = (KafkaTimeoutError, KafkaConnectionError)


class KafkaStream:
    """The Kafka backend of :class:`streaming.base.EventStream`.

    ``send``/``flush`` may be shared by threads (the producer is thread-safe); reads
    and commits may not (kafka-python consumers are not): one stream per reading thread.
    """

    def __init__(self, settings: StreamSettings, *, connect_timeout_s: float = 10.0,
                 read_timeout_s: float = 10.0, client_id: str = "codistill") -> None:
        self.settings = settings
        self.bootstrap = settings.bootstrap_servers
        self._timeout_ms = int(connect_timeout_s * 1000)
        self._read_timeout_s = read_timeout_s
        self._client_id = client_id
        self._producer: KafkaProducer | None = None
        self._reader: KafkaConsumer | None = None
        self._groups: dict[str, KafkaConsumer] = {}
        self._ends: dict[TopicPartition, int] = {}
        self._send_errors: list[BaseException] = []

    # -- plumbing ------------------------------------------------------------------------
    def common_config(self) -> dict[str, Any]:
        """Connection settings shared by producer, consumers and admin client."""
        s = self.settings
        cfg: dict[str, Any] = {
            "bootstrap_servers": s.bootstrap_servers.split(","),
            "security_protocol": s.security_protocol,
            "client_id": self._client_id,
            "bootstrap_timeout_ms": self._timeout_ms,
            "request_timeout_ms": max(self._timeout_ms, 5000) + 1000,
        }
        if s.sasl_mechanism:
            cfg.update(sasl_mechanism=s.sasl_mechanism, sasl_plain_username=s.sasl_username,
                       sasl_plain_password=s.sasl_password)
        return cfg

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate client errors: unreachable broker -> StreamUnavailable naming the address."""
        try:
            yield
        except StreamError:
            raise
        except _UNREACHABLE as exc:
            msg = f"Kafka at {self.bootstrap} unavailable ({what}): {exc}"
            raise StreamUnavailable(msg) from exc
        except KafkaError as exc:
            raise StreamError(f"Kafka at {self.bootstrap}: {what} failed: {exc}") from exc

    def _producer_(self) -> KafkaProducer:
        if self._producer is None:
            with self._errors("connect producer"):
                self._producer = KafkaProducer(
                    acks="all", linger_ms=5, enable_idempotence=True,
                    allow_auto_create_topics=False, max_block_ms=self._timeout_ms,
                    **self.common_config(),
                )
        return self._producer

    def _consumer(self, group: str | None) -> KafkaConsumer:
        if group is None and self._reader is not None:
            return self._reader
        if group is not None and group in self._groups:
            return self._groups[group]
        with self._errors("connect consumer"):
            consumer = KafkaConsumer(
                group_id=group, enable_auto_commit=False, auto_offset_reset="none",
                allow_auto_create_topics=False, **self.common_config(),
            )
        if group is None:
            self._reader = consumer
        else:
            self._groups[group] = consumer
        return consumer

    def _admin(self) -> KafkaAdminClient:
        with self._errors("connect admin client"):
            return KafkaAdminClient(**self.common_config())

    # -- topics --------------------------------------------------------------------------
    def create_topic(self, topic: str, partitions: int) -> None:
        """Create with the broker's default replication factor; an existing topic is kept."""
        admin = self._admin()
        try:
            with self._errors(f"create topic {topic}"):
                result = admin.create_topics(
                    {topic: {"num_partitions": partitions, "replication_factor": -1}},
                    timeout_ms=self._timeout_ms, raise_errors=False,
                )
                for entry in result.get("topics", []):
                    code = entry.get("error_code", 0)
                    if code not in (0, TopicAlreadyExistsError.errno):
                        raise StreamError(
                            f"Kafka at {self.bootstrap}: cannot create topic {topic}: "
                            f"error {code} {entry.get('error_message') or ''}".rstrip()
                        )
                admin.wait_for_topics([topic], timeout_ms=self._timeout_ms)
        finally:
            admin.close()

    def ensure_topics(self) -> None:
        self.create_topic(self.settings.topic, self.settings.partitions)
        self.create_topic(self.settings.dlq_topic, self.settings.partitions)

    def partitions(self, topic: str) -> list[int]:
        consumer = self._consumer(None)
        with self._errors(f"partitions of {topic}"):
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise UnknownTopic(f"unknown topic {topic!r} on Kafka at {self.bootstrap}")
        return sorted(parts)

    # -- producer side -------------------------------------------------------------------
    def send(self, topic: str, key: str, value: bytes) -> None:
        with self._errors(f"send to {topic}"):
            future = self._producer_().send(topic, key=key.encode("utf-8"), value=bytes(value))
        future.add_errback(self._send_errors.append)

    def flush(self) -> None:
        if self._producer is None:
            return
        with self._errors("flush"):
            self._producer.flush()
        if self._send_errors:
            errors, self._send_errors = self._send_errors, []
            raise StreamError(
                f"Kafka at {self.bootstrap}: {len(errors)} message(s) not delivered: {errors[0]!r}"
            )

    # -- reader side ---------------------------------------------------------------------
    def end_offset(self, topic: str, partition: int) -> int:
        tp = TopicPartition(topic, partition)
        with self._errors(f"end offset of {topic}[{partition}]"):
            end = self._consumer(None).end_offsets([tp], timeout_ms=self._timeout_ms)[tp]
        self._ends[tp] = end
        return end

    def start_offset(self, topic: str, partition: int) -> int:
        """The log start (``beginning_offsets``): retention or ``delete_records`` moves it."""
        tp = TopicPartition(topic, partition)
        with self._errors(f"start offset of {topic}[{partition}]"):
            return int(self._consumer(None).beginning_offsets([tp],
                                                              timeout_ms=self._timeout_ms)[tp])

    def delete_records(self, topic: str, partition: int, before_offset: int) -> int:
        """Remove the records below ``before_offset`` (``DeleteRecords``); the new log start."""
        admin = self._admin()
        try:
            with self._errors(f"delete records of {topic}[{partition}]"):
                admin.delete_records({TopicPartition(topic, partition): int(before_offset)},
                                     timeout_ms=self._timeout_ms)
        finally:
            admin.close()
        return self.start_offset(topic, partition)

    def read(self, topic: str, partition: int, start_offset: int, max_records: int) -> list[Record]:
        if start_offset < 0 or max_records < 0:
            raise ValueError("start_offset and max_records must be >= 0")
        tp = TopicPartition(topic, partition)
        end = self._ends.get(tp, 0)
        if start_offset + max_records > end:
            end = self.end_offset(topic, partition)
        target = min(end, start_offset + max_records)
        if max_records == 0 or start_offset >= target:
            return []
        consumer = self._consumer(None)
        out: list[Record] = []
        deadline = time.monotonic() + self._read_timeout_s
        with self._errors(f"read {topic}[{partition}]@{start_offset}"):
            if consumer.assignment() != {tp}:
                consumer.assign([tp])
            consumer.seek(tp, start_offset)
            try:
                while len(out) < max_records and time.monotonic() < deadline:
                    batch = consumer.poll(timeout_ms=200, max_records=max_records - len(out))
                    for r in batch.get(tp, []):
                        if r.offset >= start_offset and (not out or r.offset > out[-1].offset):
                            out.append(Record(topic, partition, r.offset,
                                              None if r.key is None else r.key.decode("utf-8"),
                                              r.value, r.timestamp))
                    if consumer.position(tp, timeout_ms=self._timeout_ms) >= target:
                        break
            except (OffsetOutOfRangeError, NoOffsetForPartitionError) as exc:
                start = self.start_offset(topic, partition)
                if start_offset < start:
                    raise OffsetOutOfRange(topic, partition, start_offset, start,
                                           f" on Kafka at {self.bootstrap}") from exc
                raise StreamError(
                    f"offset {start_offset} of {topic}[{partition}] is out of range on Kafka at "
                    f"{self.bootstrap} (deleted by retention?)"
                ) from exc
        return out[:max_records]

    def committed(self, group: str, topic: str, partition: int) -> int | None:
        with self._errors(f"committed offset of {group} on {topic}[{partition}]"):
            value = self._consumer(group).committed(TopicPartition(topic, partition),
                                                    timeout_ms=self._timeout_ms)
        return None if value is None or value < 0 else int(value)

    def commit(self, group: str, topic: str, offsets: Mapping[int, int]) -> None:
        payload = {TopicPartition(topic, p): OffsetAndMetadata(int(o), "", -1)
                   for p, o in offsets.items()}
        with self._errors(f"commit {group} on {topic}"):
            self._consumer(group).commit(payload, timeout_ms=self._timeout_ms)

    def group_consumer(self, group: str, topics: list[str]) -> KafkaGroupConsumer:
        return KafkaGroupConsumer(self, group, topics)

    # -- misc ----------------------------------------------------------------------------
    def describe(self) -> str:
        return f"kafka://{self.bootstrap}"

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._producer is not None:
                self._producer.close()
            for consumer in [self._reader, *self._groups.values()]:
                if consumer is not None:
                    consumer.close(autocommit=False)
            self._producer, self._reader, self._groups = None, None, {}

    def __enter__(self) -> KafkaStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KafkaGroupConsumer:
    """``subscribe``-mode consumer with manual commits (at least once).

    The short session timeout (the broker's default minimum, 6 s) lets a
    crashed inspector's partitions move to a live member quickly.
    """

    def __init__(self, stream: KafkaStream, group: str, topics: list[str],
                 session_timeout_ms: int = 6000) -> None:
        self._stream, self.group = stream, group
        with stream._errors(f"subscribe {group} to {topics}"):
            self._consumer = KafkaConsumer(
                *topics, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
                session_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=max(session_timeout_ms // 3, 1000),
                allow_auto_create_topics=False, **stream.common_config(),
            )

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Record]:
        with self._stream._errors(f"poll {self.group}"):
            batch = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out = [
            Record(r.topic, r.partition, r.offset, None if r.key is None else r.key.decode("utf-8"),
                   r.value, r.timestamp)
            for records in batch.values() for r in records
        ]
        return out

    def commit(self) -> None:
        with self._stream._errors(f"commit {self.group}"):
            self._consumer.commit()

    def close(self) -> None:
        self._consumer.close(autocommit=False)

    def __enter__(self) -> KafkaGroupConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
