"""The Kafka backend against a real KRaft broker (``kafka_bootstrap`` fixture). No mocks.

Each test uses its own topics and groups (uuid names), so tests are independent
and can share one broker.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from codistill.config import StreamSettings
from streaming import (
    Record,
    StreamError,
    StreamUnavailable,
    UnknownTopic,
    open_stream,
    partition_for,
)
from streaming.dlq import DeadLetterQueue, decode_dead_letter
from streaming.generator import QuerySpec, generate_stream
from streaming.kafka import KafkaStream

pytestmark = pytest.mark.integration


@pytest.fixture
def kafka(kafka_bootstrap: str) -> Iterator[KafkaStream]:
    name = f"itest-{uuid.uuid4().hex[:10]}"
    settings = StreamSettings(backend="kafka", bootstrap_servers=kafka_bootstrap, topic=name,
                              dlq_topic=f"{name}.dlq", partitions=3)
    stream = open_stream(settings)
    assert isinstance(stream, KafkaStream)
    stream.ensure_topics()
    yield stream
    stream.close()


def _drain(consumer, want: int, limit_s: float = 60.0, commit: bool = True) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + limit_s
    while len(got) < want and time.monotonic() < deadline:
        batch = consumer.poll(1.0, max_records=250)
        got += batch
        if batch and commit:
            consumer.commit()
    return got


def _read_partition(stream: KafkaStream, topic: str, partition: int, batch: int) -> list[Record]:
    out: list[Record] = []
    while records := stream.read(topic, partition, len(out), batch):
        assert records[0].offset == len(out)  # exactly from the requested offset, no gap
        out += records
    return out


def test_topics_are_created_idempotently(kafka: KafkaStream) -> None:
    kafka.ensure_topics()  # TopicAlreadyExists is not an error
    topic = kafka.settings.topic
    assert kafka.partitions(topic) == [0, 1, 2] == kafka.partitions(kafka.settings.dlq_topic)
    with pytest.raises(UnknownTopic):
        kafka.partitions(f"missing-{uuid.uuid4().hex}")
    assert kafka.describe() == f"kafka://{kafka.bootstrap}"


def test_group_consumer_resumes_after_close_without_gap_or_overlap(kafka: KafkaStream) -> None:
    topic, n = kafka.settings.topic, 3000
    for i in range(n):
        kafka.send(topic, f"req-{i % 101}", f"{i}".encode())
    kafka.flush()
    group = f"g-{uuid.uuid4().hex[:8]}"

    first = kafka.group_consumer(group, [topic])
    seen = _drain(first, 1000)  # commits after every batch
    lost = _drain(first, 1, commit=False)  # processed, then "crashed" before committing
    first.close()
    assert 1000 <= len(seen) < n and lost
    committed_by_first = len(seen)
    second = kafka.group_consumer(group, [topic])
    seen += _drain(second, n - len(seen))
    second.close()

    values = [r.value for r in seen]  # the uncommitted batch came again, exactly once
    assert len(values) == n and set(values) == {f"{i}".encode() for i in range(n)}
    assert {r.value for r in lost} <= {r.value for r in seen[committed_by_first:]}
    # Per-key order, and keys land where murmur2 says (so the embedded log agrees).
    for r in seen:
        assert r.partition == partition_for(r.key, 3)
    for key in {r.key for r in seen}:
        mine = [int(r.value) for r in sorted(seen, key=lambda r: r.offset) if r.key == key]
        assert mine == sorted(mine)
    # The committed group offsets are the end of every partition.
    ends = {p: kafka.end_offset(topic, p) for p in range(3)}
    assert sum(ends.values()) == n
    assert {p: kafka.committed(group, topic, p) for p in range(3)} == ends


def test_deterministic_reads_equal_what_the_group_consumer_saw(kafka: KafkaStream) -> None:
    topic = kafka.settings.topic
    for i in range(1500):
        kafka.send(topic, f"k{i % 13}", f"v{i}".encode())
    kafka.flush()
    consumer = kafka.group_consumer(f"g-{uuid.uuid4().hex[:8]}", [topic])
    seen = _drain(consumer, 1500)
    consumer.close()
    for p in range(3):
        via_group = sorted((r for r in seen if r.partition == p), key=lambda r: r.offset)
        assert _read_partition(kafka, topic, p, 128) == via_group
        assert _read_partition(kafka, topic, p, 1000) == via_group  # batch size is irrelevant
        # Arbitrary ranges, out of order: the same records every time.
        for start, count in [(37, 5), (0, 1), (len(via_group) - 3, 10), (11, 200), (37, 5)]:
            assert kafka.read(topic, p, start, count) == via_group[start : start + count]
        assert kafka.read(topic, p, len(via_group), 10) == []
        assert kafka.end_offset(topic, p) == len(via_group)


def test_manual_commit_and_committed_for_a_trainer_group(kafka: KafkaStream) -> None:
    topic, group = kafka.settings.topic, f"trainer-{uuid.uuid4().hex[:8]}"
    assert kafka.committed(group, topic, 0) is None
    kafka.commit(group, topic, {0: 0, 2: 0})
    kafka.send(topic, "x", b"1")
    kafka.flush()
    p = partition_for("x", 3)
    kafka.commit(group, topic, {p: 1})
    other = KafkaStream(kafka.settings)  # a restarted trainer sees the same commits
    try:
        assert other.committed(group, topic, p) == 1
        assert other.read(topic, p, 0, 5)[0].value == b"1"
    finally:
        other.close()


def test_dead_letter_queue_on_a_salted_stream(kafka: KafkaStream) -> None:
    topic, dlq_topic = kafka.settings.topic, kafka.settings.dlq_topic
    queries = [QuerySpec(f"q{i}", f"query {i}", [f"c{i}-{k}" for k in range(6)],
                         [1.0 if k == 0 else 0.0 for k in range(6)]) for i in range(20)]
    known = {c for q in queries for c in q.candidate_ids}
    gen = generate_stream(queries, 300, seed=9, malformed_rate=0.15)
    for m in gen.messages:
        kafka.send(topic, m.key, m.value)
    kafka.flush()

    registry = CollectorRegistry()
    dlq = DeadLetterQueue(kafka, dlq_topic, registry=registry)
    consumer = kafka.group_consumer(f"trainer-{uuid.uuid4().hex[:8]}", [topic])
    accepted = []
    for record in _drain(consumer, len(gen.messages)):
        event = dlq.check(record, lambda ids: np.array([i in known for i in ids]))
        if event is not None:
            accepted.append(event)
    consumer.close()
    kafka.flush()

    assert sorted(e.to_bytes() for e in accepted) == sorted(e.to_bytes() for e in gen.events)
    inspector = kafka.group_consumer(f"dlq-inspector-{uuid.uuid4().hex[:8]}", [dlq_topic])
    letters = [decode_dead_letter(r.value) for r in _drain(inspector, len(gen.malformed))]
    inspector.close()
    assert Counter((d.code, d.raw) for d in letters) == Counter(
        (m.kind, m.value) for m in gen.malformed)
    for d in letters:
        assert d.reason and d.source_topic == topic
        assert kafka.read(topic, d.source_partition, d.source_offset, 1)[0].value == d.raw
    for code in ("bad_json", "schema", "unknown_candidate"):
        got = registry.get_sample_value("codistill_dlq_events_total", {"reason": code})
        assert got == gen.counts[code] > 0


def test_unreachable_broker_is_a_clear_stream_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    stream = KafkaStream(StreamSettings(backend="kafka", bootstrap_servers=address),
                         connect_timeout_s=2.0)
    with pytest.raises(StreamUnavailable, match=address):
        stream.send("t", "k", b"v")
    with pytest.raises(StreamUnavailable, match=address):
        stream.partitions("t")
    with pytest.raises(StreamUnavailable, match=address):
        stream.ensure_topics()
    stream.close()


def test_reading_records_deleted_by_retention_fails_loudly(kafka: KafkaStream) -> None:
    """A trainer resuming from a checkpoint older than retention must not silently skip."""
    from kafka import KafkaAdminClient, TopicPartition

    topic = kafka.settings.topic
    for i in range(20):
        kafka.send(topic, "same-key", str(i).encode())
    kafka.flush()
    p = partition_for("same-key", 3)
    admin = KafkaAdminClient(**kafka.common_config())
    try:
        admin.delete_records({TopicPartition(topic, p): 10})
    finally:
        admin.close()
    assert [r.value for r in kafka.read(topic, p, 10, 3)] == [b"10", b"11", b"12"]
    with pytest.raises(StreamError, match="out of range"):
        kafka.read(topic, p, 2, 3)
