"""Retention: a log whose prefix was removed, and trainers that start at either end of it.

The ledger's invariant is ``[start, next)`` per partition (not ``[0, next)``): a
trainer may begin at the log start (``start_from: earliest``) or at its end
(``latest``), and a checkpoint whose offset fell below the log start stops the
trainer naming the gap unless ``accept_gap``, which the ledger records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streaming import open_stream
from streaming.base import OffsetOutOfRange
from streaming.embedded import EmbeddedStream
from student.online import TrainerError
from student.online.checkpoint import LATEST, STATE_FILE, Ledger, LedgerViolation
from tests.helpers.online import (
    end_offsets,
    make_stream,
    produce,
    run_in_process,
    setup_online,
    tiny_corpus,
)


def _state(home: Path, name: str) -> dict:
    root = home / "online" / name / "checkpoints"
    return json.loads((root / (root / LATEST).read_text().strip() / STATE_FILE).read_text())


def test_embedded_prefix_removal_keeps_offsets_stable(tmp_path: Path) -> None:
    stream = EmbeddedStream(tmp_path / "log", topic="t", partitions=1)
    stream.create_topic("t", 1)
    for i in range(30):
        stream.send("t", "k", f"v{i}".encode())
    stream.flush()
    assert stream.start_offset("t", 0) == 0
    stream.delete_records("t", 0, 12)
    assert stream.start_offset("t", 0) == 12
    assert stream.end_offset("t", 0) == 30  # offsets do not shift
    got = stream.read("t", 0, 12, 3)
    assert [(r.offset, r.value) for r in got] == [(12, b"v12"), (13, b"v13"), (14, b"v14")]
    with pytest.raises(OffsetOutOfRange,
                       match=r"t\[0\].*offset 5 is out of range, below the log start 12"):
        stream.read("t", 0, 5, 3)
    stream.delete_records("t", 0, 4)  # the start never moves back
    assert stream.start_offset("t", 0) == 12
    with pytest.raises(ValueError, match="end offset"):
        stream.delete_records("t", 0, 31)
    stream.close()
    again = EmbeddedStream(tmp_path / "log", topic="t", partitions=1)  # durable, other process
    assert again.start_offset("t", 0) == 12
    again.send("t", "k", b"v30")
    again.flush()
    assert [r.offset for r in again.read("t", 0, 29, 5)] == [29, 30]
    again.close()


def test_ledger_invariant_is_start_to_next() -> None:
    ledger = Ledger()
    ledger.begin("t", 0, 5)
    ledger.record(("t", 0, 5, 9))
    ledger.check_resume("t", {0: 9})
    with pytest.raises(LedgerViolation):
        ledger.check_resume("t", {0: 12})
    ledger.record_gap("t", 0, 9, 20)  # an accepted gap: [9, 20) never applied
    ledger.record(("t", 0, 20, 24))
    ledger.check_resume("t", {0: 24})
    assert Ledger.from_json(ledger.to_json()).to_json() == ledger.to_json()
    assert ledger.to_json()["gaps"] == [["t", 0, [[9, 20]]]]


def test_a_checkpoint_behind_the_log_start_stops_naming_the_gap(tmp_path: Path) -> None:
    settings, _ = setup_online(tmp_path, 200, seed=5)
    first, _ = run_in_process(settings, name="r", max_batches=3, checkpoint_every=3)
    assert first["batches"] == 3
    offsets = {int(p): o for p, o in first["offsets"].items()}
    topic = settings.stream.topic
    with open_stream(settings.resolved_stream()) as stream:
        p = max(offsets, key=lambda q: stream.end_offset(topic, q) - offsets[q])
        cut = offsets[p] + 5
        assert stream.end_offset(topic, p) > cut
        stream.delete_records(topic, p, cut)
        ends = end_offsets(stream, topic)
    with pytest.raises(TrainerError, match=rf"{topic}\[{p}\].*{offsets[p]}.*{cut}.*accept.gap"):
        run_in_process(settings, name="r")
    done, _ = run_in_process(settings, name="r", accept_gap=True)
    assert done["offsets"] == ends
    ledger = _state(tmp_path, "r")["ledger"]
    assert [topic, p, [[offsets[p], cut]]] in ledger["gaps"]
    assert done["counters"]["gap_records"] == 5


def test_start_from_latest_and_earliest(tmp_path: Path) -> None:
    settings, _ = setup_online(tmp_path, 120, seed=3)
    topic = settings.stream.topic
    with open_stream(settings.resolved_stream()) as stream:
        ends = end_offsets(stream, topic)
        stream.delete_records(topic, 0, 7)
    late, _ = run_in_process(settings, name="late", start_from="latest")
    assert late["offsets"] == ends and late["counters"].get("events_consumed", 0) == 0
    early, _ = run_in_process(settings, name="early", start_from="earliest")
    assert early["offsets"] == ends
    assert early["counters"]["events_consumed"] == sum(ends.values()) - 7
    assert [topic, 0, [[7, ends["0"]]]] in _state(tmp_path, "early")["ledger"]["intervals"]
    with open_stream(settings.resolved_stream()) as stream:  # more traffic, then resume
        produce(stream, topic, make_stream(tiny_corpus(), 40, seed=9))
        new_ends = end_offsets(stream, topic)
    more, _ = run_in_process(settings, name="late")
    assert more["offsets"] == new_ends
    assert more["counters"]["events_consumed"] == sum(new_ends.values()) - sum(ends.values())
    starts = _state(tmp_path, "late")["ledger"]["starts"]
    assert starts == [[topic, int(q), o] for q, o in sorted(ends.items())]


def test_cli_has_the_retention_flags() -> None:
    from typer.testing import CliRunner

    from codistill.app.cli import app

    out = CliRunner().invoke(app, ["student", "online", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "--start-from" in out.output and "--accept-gap" in out.output
