"""Events, the embedded event log, dead letters and the event generator (no server needed)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from codistill.config import StreamSettings
from streaming import (
    Feedback,
    Impression,
    InvalidEvent,
    StreamError,
    UnknownTopic,
    open_stream,
    parse_event,
    partition_for,
)
from streaming.dlq import DeadLetterQueue, Rejection, decode_dead_letter, validate
from streaming.embedded import INDEX, INDEX_INTERVAL, EmbeddedStream, encode_frame
from streaming.generator import VALID, QuerySpec, generate_stream

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

# ---------------------------------------------------------------------------------- events
ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
times = st.builds(
    lambda dt, minutes: dt.replace(tzinfo=timezone(timedelta(minutes=minutes))),
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1)),
    st.integers(-23 * 60, 23 * 60),
)
impressions = st.builds(
    Impression, request_id=ids, query_id=ids, query=st.text(min_size=1, max_size=40),
    candidate_ids=st.lists(ids, min_size=1, max_size=8, unique=True), model_version=ids,
    event_time=times,
)
feedbacks = st.builds(
    Feedback, request_id=ids, candidate_id=ids, action=st.sampled_from(["click", "accept", "skip"]),
    position=st.integers(1, 1000),
    dwell_ms=st.none() | st.floats(0, 1e9, allow_nan=False, allow_infinity=False),
    event_time=times,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, database=None)
@given(impressions | feedbacks)
def test_event_round_trip(event: Impression | Feedback) -> None:
    back = parse_event(event.to_bytes())
    assert back == event and type(back) is type(event)
    assert back.event_time.utcoffset() == timedelta(0)  # canonical UTC


def _only_invalid(raw: bytes) -> None:
    try:
        parse_event(raw)
    except InvalidEvent as exc:
        assert exc.reason and exc.code in {"bad_json", "schema", "unsupported_version"}


@settings(max_examples=400, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_invalid_event(raw: bytes) -> None:
    _only_invalid(raw)


@settings(max_examples=400, deadline=None, database=None)
@given(json_values)
def test_random_json_raises_only_invalid_event(value: object) -> None:
    _only_invalid(json.dumps(value).encode())


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(impressions | feedbacks, st.data())
def test_mutated_events_raise_only_invalid_event(
    event: Impression | Feedback, data: st.DataObject
) -> None:
    doc = json.loads(event.to_bytes())
    key = data.draw(st.sampled_from(sorted(doc)))
    if data.draw(st.booleans()):
        del doc[key]
    else:
        doc[key] = data.draw(json_values)
    _only_invalid(json.dumps(doc).encode())


def _feedback_doc(**changes: object) -> dict:
    doc = {"type": "feedback", "request_id": "r1", "candidate_id": "c1", "action": "click",
           "position": 1, "dwell_ms": 12.5, "event_time": "2026-03-01T12:00:00+01:00"}
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


def test_unknown_future_fields_are_ignored() -> None:
    ev = parse_event(json.dumps(_feedback_doc(new_field={"x": 1}, another=[1, 2])).encode())
    assert isinstance(ev, Feedback) and ev.candidate_id == "c1"
    assert ev.event_time == datetime(2026, 3, 1, 11, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("doc", "code", "field"),
    [
        (_feedback_doc(request_id=...), "schema", "request_id"),
        (_feedback_doc(request_id=""), "schema", "request_id"),
        (_feedback_doc(action="like"), "schema", "action"),
        (_feedback_doc(position=0), "schema", "position"),
        (_feedback_doc(dwell_ms=-1), "schema", "dwell_ms"),
        (_feedback_doc(event_time="2026-03-01T12:00:00"), "schema", "event_time"),
        (_feedback_doc(type=...), "schema", "type"),
        (_feedback_doc(type="purchase"), "schema", "type"),
        (_feedback_doc(schema_version=3), "unsupported_version", "schema_version"),
        (_feedback_doc(schema_version="1"), "schema", "schema_version"),
        ({"type": "impression", "request_id": "r", "query_id": "q", "query": "x",
          "candidate_ids": [], "model_version": "m", "event_time": "2026-03-01T12:00:00Z"},
         "schema", "candidate_ids"),
        ({"type": "impression", "request_id": "r", "query_id": "q", "query": "x",
          "candidate_ids": ["a", "b", "a"], "model_version": "m",
          "event_time": "2026-03-01T12:00:00Z"}, "schema", "candidate_ids"),
    ],
)
def test_invalid_event_reason_names_the_field(doc: dict, code: str, field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(json.dumps(doc).encode())
    assert info.value.code == code
    assert f"'{field}" in info.value.reason, info.value.reason


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[1, 2]", b"null", b'"text"', b"NaN"])
def test_bad_json_is_reported_as_such(raw: bytes) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    assert info.value.code == "bad_json"


def test_partitioner_matches_java_murmur2() -> None:
    # Vectors from Kafka's UtilsTest.testMurmur2 (signed Java ints), partitioned like
    # DefaultPartitioner: toPositive(murmur2(key)) % n.
    vectors = {"21": -973932308, "foobar": -790332482, "a-little-bit-long-string": -985981536,
               "a-little-bit-longer-string": -1486304829, "abc": 479470107}
    for key, h in vectors.items():
        for n in (1, 3, 4, 7, 12):
            assert partition_for(key, n) == (h & 0x7FFFFFFF) % n


# ---------------------------------------------------------------------------- embedded log
@pytest.fixture
def stream(tmp_path: Path) -> EmbeddedStream:
    s = EmbeddedStream(tmp_path / "events", topic="ev", dlq_topic="ev.dlq", partitions=4)
    s.ensure_topics()
    yield s
    s.close()


def _read_all(s: EmbeddedStream, topic: str, batch: int = 97) -> list:
    out = []
    for p in s.partitions(topic):
        offset = 0
        while records := s.read(topic, p, offset, batch):
            assert records[0].offset == offset
            out.extend(records)
            offset = records[-1].offset + 1
    return out


def test_open_stream_defaults_to_embedded(tmp_path: Path) -> None:
    s = open_stream(StreamSettings(path=tmp_path / "ev", partitions=3))
    assert isinstance(s, EmbeddedStream) and s.describe().startswith("embedded:")
    s.ensure_topics()
    assert s.partitions("codistill.events") == [0, 1, 2]
    with pytest.raises(UnknownTopic):
        s.partitions("nope")
    with pytest.raises(UnknownTopic):
        s.send("nope", "k", b"v")
    s.close()


def test_round_trip_and_per_key_order(stream: EmbeddedStream) -> None:
    sent = [(f"req-{i % 37}", f"{i}".encode()) for i in range(3000)]
    for key, value in sent:
        stream.send("ev", key, value)
    stream.flush()
    records = _read_all(stream, "ev")
    assert len(records) == 3000
    by_key = defaultdict(list)
    for r in records:
        assert r.partition == partition_for(r.key, 4)  # same partitioning as Kafka
        by_key[r.key].append(r.value)
    for key in by_key:
        assert by_key[key] == [v for k, v in sent if k == key]
    assert sum(stream.end_offset("ev", p) for p in range(4)) == 3000
    assert {r.timestamp_ms > 0 for r in records} == {True}


def test_unflushed_records_are_not_visible(stream: EmbeddedStream, tmp_path: Path) -> None:
    stream.send("ev", "k", b"v")
    other = EmbeddedStream(tmp_path / "events")
    p = partition_for("k", 4)
    assert other.end_offset("ev", p) == 0
    stream.flush()
    assert [r.value for r in other.read("ev", p, 0, 10)] == [b"v"]


def test_reads_by_offset_range_are_exact(stream: EmbeddedStream, tmp_path: Path) -> None:
    n = INDEX_INTERVAL * 40 + 17
    for i in range(n):
        stream.send("ev", "one-key", f"value-{i}".encode() * (1 + i % 5))
    stream.flush()
    p = partition_for("one-key", 4)
    full = stream.read("ev", p, 0, n + 10)
    assert [r.offset for r in full] == list(range(n))
    rng = random.Random(7)
    fresh = EmbeddedStream(tmp_path / "events")  # cold caches: sparse index path
    for s in (stream, fresh):
        for _ in range(300):
            start, count = rng.randrange(n + 5), rng.randrange(0, 300)
            assert s.read("ev", p, start, count) == full[start : start + count]
    assert fresh.end_offset("ev", p) == n
    assert (tmp_path / "events" / "ev" / f"{p}.idx").stat().st_size == (n // INDEX_INTERVAL) * 16
    with pytest.raises(ValueError):
        stream.read("ev", 9, 0, 1)
    with pytest.raises(ValueError):
        stream.read("ev", p, -1, 1)


_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from streaming.embedded import EmbeddedStream
    s = EmbeddedStream({path!r})
    name, n = sys.argv[1], int(sys.argv[2])
    for i in range(n):
        s.send("ev", "shared-key", f"{{name}}:{{i}}".encode())
        if i % 50 == 49:
            s.flush()
    s.close()
    """
)


def test_durable_and_shared_across_processes(stream: EmbeddedStream, tmp_path: Path) -> None:
    """Two writer processes append to one partition concurrently; a third process reads."""
    code = _WRITER.format(root=str(ROOT), path=str(tmp_path / "events"))
    procs = [subprocess.Popen([sys.executable, "-c", code, name, "2000"]) for name in "AB"]
    assert [p.wait(120) for p in procs] == [0, 0]
    p = partition_for("shared-key", 4)
    values = [r.value.decode() for r in stream.read("ev", p, 0, 10_000)]
    assert len(values) == 4000 == stream.end_offset("ev", p)
    for name in "AB":  # each writer's records complete, in its order
        assert [v for v in values if v.startswith(name)] == [f"{name}:{i}" for i in range(2000)]
    reader = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r});"
         "from streaming.embedded import EmbeddedStream;"
         f"s = EmbeddedStream({str(tmp_path / 'events')!r});"
         f"print(len(s.read('ev', {p}, 0, 10**6)), s.end_offset('ev', {p}))"],
        capture_output=True, text=True, check=True,
    )
    assert reader.stdout.split() == ["4000", "4000"]


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    import streaming.embedded as emb
    real = emb._write_all
    def torn_write(fd, data, pos):  # fault injection: the append stops half way for a while
        half = len(data) // 2
        real(fd, data[:half], pos)
        print("HALF", flush=True)
        time.sleep(60)
        real(fd, data[half:], pos + half)
    s = emb.EmbeddedStream({path!r})
    for i in range(int(sys.argv[1])):
        s.send("ev", "k", b"x" * 1000 + str(i).encode())
    s.flush()
    emb._write_all = torn_write
    s.send("ev", "k", b"torn" * 1000)
    s.flush()
    """
)


def test_writer_killed_mid_append_leaves_no_torn_record(
    stream: EmbeddedStream, tmp_path: Path
) -> None:
    code = _SLOW_WRITER.format(root=str(ROOT), path=str(tmp_path / "events"))
    proc = subprocess.Popen([sys.executable, "-c", code, "100"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "HALF"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    p = partition_for("k", 4)
    log = tmp_path / "events" / "ev" / f"{p}.log"
    whole = sum(len(encode_frame("k", b"x" * 1000 + str(i).encode(), 0)) for i in range(100))
    assert log.stat().st_size > whole  # the torn half-record is really there
    fresh = EmbeddedStream(tmp_path / "events")
    records = fresh.read("ev", p, 0, 1000)
    assert [r.value for r in records] == [b"x" * 1000 + str(i).encode() for i in range(100)]
    assert fresh.end_offset("ev", p) == 100
    # The next writer truncates the torn tail and continues at offset 100.
    fresh.send("ev", "k", b"after")
    fresh.flush()
    assert log.stat().st_size == whole + len(encode_frame("k", b"after", 0))
    assert [(r.offset, r.value) for r in stream.read("ev", p, 99, 5)][1:] == [(100, b"after")]


def test_writer_killed_at_random_times_never_corrupts(
    stream: EmbeddedStream, tmp_path: Path
) -> None:
    """Unassisted SIGKILLs of a busy writer. Linux stops a large write() at a fatal signal,
    so multi-MB appends get torn for real; whatever survives must read back whole."""
    size = 4_000_000
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from streaming.embedded import EmbeddedStream
        s = EmbeddedStream({str(tmp_path / "events")!r})
        first = i = int(sys.argv[1])
        while True:
            s.send("ev", "k", str(i).encode().ljust({size}, b"."))  # > 1 MiB: written at once
            if i % 4 == 3:
                s.flush()
            if i == first:
                print("READY", flush=True)
            i += 1
        """
    )
    p = partition_for("k", 4)
    frame = len(encode_frame("k", b"." * size, 0))
    log = tmp_path / "events" / "ev" / f"{p}.log"
    rng, torn, kills = random.Random(3), 0, 0
    while kills < 3 or (torn == 0 and kills < 25):
        reader = EmbeddedStream(tmp_path / "events")
        start = reader.end_offset("ev", p)
        proc = subprocess.Popen([sys.executable, "-c", code, str(start)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"READY\n"
        time.sleep(rng.random() * 0.4)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        kills += 1
        reader = EmbeddedStream(tmp_path / "events")
        n = reader.end_offset("ev", p)
        torn += log.stat().st_size > n * frame
        for offset in range(0, n, 8):
            for r in reader.read("ev", p, offset, 8):
                assert int(r.value.rstrip(b".")) == r.offset and len(r.value) == size
        reader.close()
    assert torn, f"no torn tail in {kills} kills"


def test_torn_index_entry_is_tolerated(stream: EmbeddedStream, tmp_path: Path) -> None:
    for i in range(INDEX_INTERVAL * 3):
        stream.send("ev", "k", str(i).encode())
    stream.flush()
    p = partition_for("k", 4)
    idx = tmp_path / "events" / "ev" / f"{p}.idx"
    with open(idx, "ab") as fh:
        fh.write(b"\x01\x02\x03")  # a writer died while appending an index entry
    fresh = EmbeddedStream(tmp_path / "events")
    target = INDEX_INTERVAL * 2 + 5
    assert fresh.read("ev", p, target, 1)[0].value == str(target).encode()
    fresh.send("ev", "k", b"more")
    fresh.flush()
    assert idx.stat().st_size % INDEX.size == 0
    assert fresh.read("ev", p, INDEX_INTERVAL * 3, 1)[0].value == b"more"


def test_group_offsets(stream: EmbeddedStream, tmp_path: Path) -> None:
    assert stream.committed("trainer", "ev", 0) is None
    stream.commit("trainer", "ev", {0: 5, 2: 9})
    stream.commit("trainer", "ev.dlq", {1: 3})
    stream.commit("trainer", "ev", {0: 6})
    other = EmbeddedStream(tmp_path / "events")  # another process' view: from disk
    assert [other.committed("trainer", "ev", p) for p in range(4)] == [6, None, 9, None]
    assert other.committed("trainer", "ev.dlq", 1) == 3
    assert other.committed("odd group/name?", "ev", 0) is None
    other.commit("odd group/name?", "ev", {3: 1})
    assert stream.committed("odd group/name?", "ev", 3) == 1
    with pytest.raises(ValueError):
        stream.commit("trainer", "ev", {7: 1})
    leftovers = [f for f in (tmp_path / "events").rglob("*") if f.name.endswith(".tmp")]
    assert not leftovers


def test_concurrent_commits_from_processes_keep_every_topic(
    stream: EmbeddedStream, tmp_path: Path
) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from streaming.embedded import EmbeddedStream
        s = EmbeddedStream({str(tmp_path / "events")!r})
        for i in range(1, 101):
            s.commit("g", sys.argv[1], {{0: i}})
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, t]) for t in ("ev", "ev.dlq")]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert stream.committed("g", "ev", 0) == 100 == stream.committed("g", "ev.dlq", 0)


def test_group_consumer_resumes_without_gap_or_overlap(stream: EmbeddedStream) -> None:
    for i in range(1000):
        stream.send("ev", f"r{i}", str(i).encode())
    stream.flush()
    seen: list[bytes] = []
    with stream.group_consumer("inspector", ["ev"]) as consumer:
        with pytest.raises(StreamError):
            stream.group_consumer("inspector", ["ev"])  # one member per embedded group
        for _ in range(3):
            seen += [r.value for r in consumer.poll(0.1, max_records=150)]
            consumer.commit()
        consumer.poll(0.1, max_records=100)  # read but not committed: redelivered later
    with stream.group_consumer("inspector", ["ev"]) as consumer:
        while batch := consumer.poll(0.1, max_records=200):
            seen += [r.value for r in batch]
            consumer.commit()
    assert len(seen) == 1000 and sorted(seen) == sorted(str(i).encode() for i in range(1000))


# ------------------------------------------------------------------------------ generator
def _queries(n: int = 30, k: int = 10) -> list[QuerySpec]:
    return [QuerySpec(f"q{i}", f"query number {i}", [f"c{i}-{j}" for j in range(k)],
                      [2.0 if j == 0 else (1.0 if j == 1 else 0.0) for j in range(k)])
            for i in range(n)]


def test_generator_is_deterministic_and_follows_the_click_model() -> None:
    qs = _queries()
    a = generate_stream(qs, 3000, seed=11, malformed_rate=0.05)
    b = generate_stream(qs, 3000, seed=11, malformed_rate=0.05)
    assert [m.value for m in a.messages] == [m.value for m in b.messages]
    assert [m.value for m in generate_stream(qs, 50, seed=12).messages] != [
        m.value for m in a.messages[:50]]
    imps = [e for e in a.events if isinstance(e, Impression)]
    fbs = [e for e in a.events if isinstance(e, Feedback)]
    assert len(imps) == 3000
    clicks = {(f.request_id, f.candidate_id) for f in fbs if f.action == "click"}
    accepts = {(f.request_id, f.candidate_id) for f in fbs if f.action == "accept"}
    assert accepts and accepts <= clicks
    shown, clicked = Counter(), Counter()
    rel_rank = {}
    for imp in imps:
        for r, c in enumerate(imp.candidate_ids, 1):
            shown[r] += 1
            clicked[r] += (imp.request_id, c) in clicks
            rel_rank.setdefault(c.endswith("-0"), []).append(r)
    ctr = [clicked[r] / shown[r] for r in range(1, 11)]
    assert ctr[0] > 2 * ctr[1] > 0 and ctr[1] > ctr[4] > ctr[9]  # position bias
    assert np.mean(rel_rank[True]) < np.mean(rel_rank[False])  # the ranker is informative
    by_request = {i.request_id: i for i in imps}
    for f in fbs:  # feedback positions agree with the impression
        assert by_request[f.request_id].candidate_ids[f.position - 1] == f.candidate_id
    # Out of order, but boundedly so.
    delivered = [m.delivery_time for m in a.messages]
    assert delivered == sorted(delivered)
    ev_times = [e.event_time for e in a.events]
    assert ev_times != sorted(ev_times)
    assert all(m.delivery_time - e.event_time <= timedelta(seconds=5)
               for m, e in zip([m for m in a.messages if m.kind == VALID], a.events, strict=True))
    assert set(a.counts) == {VALID, "bad_json", "schema", "unknown_candidate"}


# ------------------------------------------------------------------------------------ DLQ
def test_dead_letter_queue_on_a_salted_stream(stream: EmbeddedStream) -> None:
    qs = _queries()
    known = {c for q in qs for c in q.candidate_ids}
    gen = generate_stream(qs, 400, seed=5, malformed_rate=0.2)
    for m in gen.messages:
        stream.send("ev", m.key, m.value)
    stream.flush()

    registry = CollectorRegistry()
    dlq = DeadLetterQueue(stream, "ev.dlq", registry=registry)

    def lookup(candidate_ids: list[str]) -> np.ndarray:
        return np.array([c in known for c in candidate_ids])

    accepted = [e for r in _read_all(stream, "ev") if (e := dlq.check(r, lookup)) is not None]
    stream.flush()
    assert sorted(e.to_bytes() for e in accepted) == sorted(e.to_bytes() for e in gen.events)

    letters = [decode_dead_letter(r.value) for r in _read_all(stream, "ev.dlq")]
    want = Counter((m.kind, m.value) for m in gen.malformed)
    assert Counter((d.code, d.raw) for d in letters) == want
    for d in letters:
        assert d.source_topic == "ev" and d.reason and d.source_offset is not None
        src = stream.read("ev", d.source_partition, d.source_offset, 1)[0]
        assert src.value == d.raw
    for code in ("bad_json", "schema", "unknown_candidate"):
        got = registry.get_sample_value("codistill_dlq_events_total", {"reason": code})
        assert got == gen.counts[code] > 0


def test_validate_names_unknown_candidates() -> None:
    imp = Impression(request_id="r", query_id="q", query="x", candidate_ids=["a", "zz", "b"],
                     model_version="m", event_time=T0)
    result = validate(imp.to_bytes(), lambda ids: [i != "zz" for i in ids])
    assert isinstance(result, Rejection) and result.code == "unknown_candidate"
    assert "zz" in result.reason and "candidate_ids" in result.reason
    assert validate(imp.to_bytes(), lambda ids: [True] * len(ids)) == imp
    assert validate(imp.to_bytes()) == imp
    assert isinstance(validate(b"\x00garbage"), Rejection)
    with pytest.raises(RuntimeError):  # a store outage is not the message's fault
        validate(imp.to_bytes(), lambda ids: (_ for _ in ()).throw(RuntimeError("store down")))


def test_a_new_group_consumer_starts_at_the_log_start_after_a_prefix_removal(
    stream: EmbeddedStream,
) -> None:
    for i in range(20):
        stream.send("ev", "k", str(i).encode())
    stream.flush()
    p = partition_for("k", 4)
    stream.delete_records("ev", p, 8)
    with stream.group_consumer("fresh-group", ["ev"]) as consumer:
        got = consumer.poll(timeout_s=2.0, max_records=100)
    assert [r.offset for r in got] == list(range(8, 20))
