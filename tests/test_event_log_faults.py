"""Faults of the embedded event log that must lose nothing and corrupt nothing silently.

* Readers see only records that were fsynced: a record a checkpoint counted must
  survive an OS crash, or later records would reuse its offset.
* A bad frame *before* the durable end is corruption (bit rot, a bad disk, someone
  editing the file), not a torn tail: it is reported with file and offsets, nothing
  past it is served or appended, until an explicit ``repair``.
* A torn tail *past* the durable end (a writer killed mid-append) is still repaired
  by the next writer on its own.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streaming.base import StreamError
from streaming.embedded import EmbeddedStream, encode_frame
from streaming.partitioner import partition_for

TOPIC, KEY = "codistill.events", "k"


def _open(path: Path) -> EmbeddedStream:
    s = EmbeddedStream(path, topic=TOPIC, dlq_topic=TOPIC + ".dlq", partitions=2)
    s.ensure_topics()
    return s


def _values(n: int) -> list[bytes]:
    return [f"record-{i}:".encode() + b"x" * (i % 13) for i in range(n)]


def _written(path: Path, n: int) -> tuple[int, Path]:
    s = _open(path)
    for v in _values(n):
        s.send(TOPIC, KEY, v)
    s.flush()
    s.close()
    p = partition_for(KEY, 2)
    return p, path / TOPIC / f"{p}.log"


def _read_all(s: EmbeddedStream, p: int) -> list:
    out, offset = [], 0
    while records := s.read(TOPIC, p, offset, 16):
        out += records
        offset = records[-1].offset + 1
    return out


def test_records_are_served_only_after_their_fsync(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes in the file are not records yet: only an fsync that succeeded publishes them."""
    writer = _open(tmp_path / "ev")
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "injected: fsync failed")

    writer.send(TOPIC, KEY, b"first")
    writer.flush()  # the partition's files exist and are open: the next append only writes
    big = b"x" * 700_000  # two of these pass the write buffer: written to the file at once
    monkeypatch.setattr(os, "fsync", failing_fsync)
    writer.send(TOPIC, KEY, big)
    with pytest.raises(OSError, match="injected"):
        writer.send(TOPIC, KEY, big)
        writer.flush()
    p = partition_for(KEY, 2)
    reader = _open(tmp_path / "ev")
    assert reader.end_offset(TOPIC, p) == 1
    assert [r.value for r in reader.read(TOPIC, p, 0, 10)] == [b"first"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    writer.flush()  # nothing was lost: the batch is still buffered and goes out now
    assert reader.end_offset(TOPIC, p) == 3
    assert [r.value for r in reader.read(TOPIC, p, 0, 10)] == [b"first", big, big]


def _frame_starts(n: int) -> list[int]:
    starts, pos = [], 0
    for v in _values(n):
        starts.append(pos)
        pos += len(encode_frame(KEY, v, 0))
    return starts


@pytest.mark.parametrize("seed", range(6))
def test_a_flipped_byte_before_the_last_frame_is_reported_and_repaired_on_request(
    tmp_path: Path, seed: int
) -> None:
    n = 150
    p, log = _written(tmp_path / "ev", n)
    starts = _frame_starts(n)
    rng = random.Random(seed)
    at = rng.randrange(0, starts[-1])  # any byte of any frame but the last
    bad = max(i for i, s in enumerate(starts) if s <= at)  # the frame it belongs to
    data = bytearray(log.read_bytes())
    data[at] ^= 0xFF
    log.write_bytes(bytes(data))

    reader = _open(tmp_path / "ev")
    with pytest.raises(StreamError, match="corrupt") as info:
        _read_all(reader, p)
    assert str(log) in str(info.value) and f"offset {bad}" in str(info.value)
    assert [r.offset for r in reader.read(TOPIC, p, 0, bad)] == list(range(bad))  # before it
    with pytest.raises(StreamError, match="corrupt"):
        reader.end_offset(TOPIC, p)
    writer = _open(tmp_path / "ev")
    writer.send(TOPIC, KEY, b"must not land after garbage")
    with pytest.raises(StreamError, match="corrupt"):
        writer.flush()

    reports = _open(tmp_path / "ev").repair(TOPIC)
    assert [(r.partition, r.kept, r.dropped) for r in reports if r.dropped] == [(p, bad, n - bad)]
    fresh = _open(tmp_path / "ev")
    assert fresh.end_offset(TOPIC, p) == bad
    assert [r.value for r in _read_all(fresh, p)] == _values(n)[:bad]
    fresh.send(TOPIC, KEY, b"after repair")
    fresh.flush()
    assert fresh.read(TOPIC, p, bad, 5)[0].value == b"after repair"


@pytest.mark.parametrize("seed", range(4))
def test_a_log_cut_short_below_its_durable_end_is_corruption(tmp_path: Path, seed: int) -> None:
    n = 120
    p, log = _written(tmp_path / "ev", n)
    starts = _frame_starts(n)
    cut = random.Random(seed).randrange(1, log.stat().st_size - 1)
    with open(log, "r+b") as fh:
        fh.truncate(cut)
    whole = sum(1 for s, e in zip(starts, [*starts[1:], 1 << 60], strict=True) if e <= cut)
    reader = _open(tmp_path / "ev")
    with pytest.raises(StreamError, match="corrupt"):
        _read_all(reader, p)
    reports = reader.repair(TOPIC)
    assert [(r.kept, r.dropped) for r in reports if r.partition == p] == [(whole, n - whole)]
    assert [r.value for r in _read_all(_open(tmp_path / "ev"), p)] == _values(n)[:whole]


def test_a_torn_tail_past_the_durable_end_is_repaired_without_asking(tmp_path: Path) -> None:
    n = 40
    p, log = _written(tmp_path / "ev", n)
    torn = encode_frame(KEY, b"y" * 500, 0)
    with open(log, "ab") as fh:
        fh.write(torn[: len(torn) // 2])  # a writer killed half way through an append
    reader = _open(tmp_path / "ev")
    assert [r.value for r in _read_all(reader, p)] == _values(n)
    reader.send(TOPIC, KEY, b"next")
    reader.flush()
    assert reader.read(TOPIC, p, n, 2)[0].value == b"next"


def test_events_repair_command_reports_what_it_dropped(tmp_path: Path) -> None:
    from codistill.app.cli import app

    home = tmp_path / "home"
    p, log = _written(home / "events", 30)
    data = bytearray(log.read_bytes())
    data[_frame_starts(30)[10] + 9] ^= 0x01
    log.write_bytes(bytes(data))
    res = CliRunner().invoke(app, ["--home", str(home), "events", "repair"])
    assert res.exit_code == 0, res.output
    assert f"{TOPIC}[{p}]" in res.output and "dropped 20" in res.output
    assert _open(home / "events").end_offset(TOPIC, p) == 10
