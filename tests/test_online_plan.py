"""The batch plan: live mode with an idle partition, and a crash between plan and step.

* One partition without traffic must not stop the trainer (the old strict order
  waited for it forever), and its impressions must close: its join watermark
  follows the busy partitions' once it is idle for ``max_batch_wait_s``.
* Every decision is written into the plan before its step; a trainer killed
  between the two replays the *recorded* entry after a restart, not a fresh
  decision (which would differ: the log grew meanwhile).
* The store reads of a batch are pinned to the sequence its entry recorded.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from stores import open_store
from streaming import open_stream, partition_for
from streaming.base import Record
from streaming.dlq import DeadLetterQueue
from streaming.events import Impression
from student.online import OnlineTrainer
from student.online.plan import PlanLog, check_coverage
from student.online.reader import validate_records
from tests.helpers.online import (
    VERSION,
    fill_store,
    make_stream,
    online_settings,
    run_trainer,
    tiny_corpus,
    trainer_config,
    wait_for,
)

IDLE = 3


def _messages(seed: int, n: int, keep, start: datetime | None = None) -> list:
    kw = {} if start is None else {"start": start}
    gen = make_stream(tiny_corpus(), n, seed, **kw)
    return [m for m in gen.messages if keep(partition_for(m.key, 4), int(m.key.rsplit("-", 1)[1]))]


def _setup(home: Path, keep) -> tuple:
    settings = online_settings(home)
    with open_store(settings.resolved_store()) as store:
        fill_store(store, tiny_corpus())
    with open_stream(settings.resolved_stream()) as stream:
        stream.ensure_topics()
        for m in _messages(1, 300, keep):
            stream.send(settings.stream.topic, m.key, m.value)
        stream.flush()
        ends = {p: stream.end_offset(settings.stream.topic, p) for p in range(4)}
    return settings, ends


def _start(trainer: OnlineTrainer) -> threading.Thread:
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    return thread


def _offsets(trainer: OnlineTrainer) -> dict[int, int] | None:
    state = getattr(trainer, "state", None)
    return None if state is None else dict(state.offsets)


def _early_on_idle(p: int, i: int) -> bool:
    return p != IDLE or i < 20  # the idle partition: a few requests at the very start


def test_live_mode_trains_busy_partitions_past_an_idle_one(tmp_path: Path) -> None:
    settings, ends = _setup(tmp_path, _early_on_idle)
    assert 0 < ends[IDLE] < 16 and all(ends[p] >= 48 for p in range(3))
    trainer = OnlineTrainer(settings, trainer_config(
        name="live", until_end=False, checkpoint_every=1000, poll_interval_s=0.05))
    thread = _start(trainer)
    try:
        full = {p: ends[p] // 16 * 16 for p in range(3)}
        assert wait_for(lambda: getattr(trainer, "state", None) is not None and all(
            trainer.state.offsets.get(p) == full[p] for p in range(3)), timeout=60), (
            f"busy partitions stalled at {_offsets(trainer)}, full batches end at {full}")
        assert trainer.state.offsets[IDLE] == 0  # no full batch there, no max_batch_wait_s
    finally:
        trainer.request_stop()
        thread.join(60)
        trainer.close()


def test_an_idle_partition_gets_a_partial_batch_and_its_impressions_close(
        tmp_path: Path) -> None:
    settings, ends = _setup(tmp_path, _early_on_idle)
    topic = settings.stream.topic
    trainer = OnlineTrainer(settings, trainer_config(
        name="idle", until_end=False, checkpoint_every=1000, poll_interval_s=0.05,
        max_batch_wait_s=0.3))
    thread = _start(trainer)
    try:
        assert wait_for(lambda: getattr(trainer, "state", None) is not None
                        and trainer.state.offsets.get(IDLE) == ends[IDLE], timeout=60)
        lane = trainer.joiner._lanes[IDLE]
        assert lane.pending  # its own watermark never passes its impressions' windows
        # busy partitions keep getting traffic (later event times); the idle one none
        later = _messages(2, 150, lambda p, i: p != IDLE, datetime(2026, 1, 1, 0, 10, tzinfo=UTC))
        with open_stream(settings.resolved_stream()) as stream:
            for chunk in range(0, len(later), 50):
                for m in later[chunk:chunk + 50]:
                    stream.send(topic, m.key, m.value)
                stream.flush()
                if wait_for(lambda: not lane.pending, timeout=1.0):
                    break
        assert wait_for(lambda: not lane.pending, timeout=30), "idle impressions never closed"
    finally:
        trainer.request_stop()
        thread.join(60)
        trainer.close()
    entries = PlanLog(tmp_path / "online" / "idle" / "checkpoints-plan").entries()
    assert any(e.partition == IDLE and e.kind == "partial" for e in entries)
    assert any(IDLE in e.advance for e in entries)
    covered = check_coverage(entries)
    assert {p: nxt for p, (_, nxt) in covered.items()} == {
        p: o for p, o in trainer.state.offsets.items() if o}
    with open_store(settings.resolved_store()) as store:
        assert {e.store_seq for e in entries} == {store.get_version(VERSION).sequence}


def test_a_crash_between_plan_and_step_replays_the_recorded_entry(tmp_path: Path) -> None:
    settings, ends = _setup(tmp_path, lambda p, i: i < 120)
    topic = settings.stream.topic
    live = {"name": "crashy", "batch_size": 1000, "checkpoint_every": 1000,
            "poll_interval_s": 0.05, "max_batch_wait_s": 0.05, "dim": 16, "out_dim": 16,
            "max_vocab": 512, "lr": 0.01}
    run = run_trainer(settings, live, crash_at="after_plan:2", log_path=tmp_path / "c.log")
    assert run.killed, (run.returncode, run.log[-3000:])
    plan = tmp_path / "online" / "crashy" / "checkpoints-plan"
    recorded = json.loads((plan / "000000002.json").read_text())
    assert recorded["kind"] == "partial" and recorded["end"] == ends[recorded["partition"]]
    # the log grows: a fresh decision for batch 2 would now take more records
    p = recorded["partition"]
    more = _messages(3, 200, lambda q, i: q == p, datetime(2026, 1, 1, 1, tzinfo=UTC))
    with open_stream(settings.resolved_stream()) as stream:
        for m in more:
            stream.send(topic, m.key, m.value)
        stream.flush()
        new_end = stream.end_offset(topic, p)
    assert new_end > recorded["end"]
    final = run_trainer(settings, {**live, "until_end": True}, log_path=tmp_path / "c.log")
    assert final.returncode == 0, final.log[-3000:]
    assert json.loads((plan / "000000002.json").read_text()) == recorded
    entries = PlanLog(plan).entries()
    assert (entries[1].partition, entries[1].start, entries[1].end) == (
        p, recorded["start"], recorded["end"])
    assert final.summary["offsets"][str(p)] == new_end
    check_coverage(entries)


def test_store_reads_are_pinned_to_the_recorded_sequence(tmp_path: Path) -> None:
    settings = online_settings(tmp_path)
    corpus = tiny_corpus()
    with open_store(settings.resolved_store()) as store, \
            open_stream(settings.resolved_stream()) as stream:
        fill_store(store, corpus)
        seq = store.get_version(VERSION).sequence
        store.put_texts({"late-cand": "def late():\n    return 1"})
        store.put_embeddings(VERSION, ["late-cand"], np.ones((1, 8), dtype=np.float32))
        assert store.get_version(VERSION).sequence > seq
        stream.ensure_topics()
        q = corpus.queries[0]
        imp = Impression(request_id="r1", query_id=q.query_id, query=q.query,
                         candidate_ids=[*q.candidate_ids[:2], "late-cand"],
                         model_version="m", event_time=datetime(2026, 1, 1, tzinfo=UTC))
        rec = Record(settings.stream.topic, 0, 0, "r1", imp.model_dump_json().encode(), 0)
        dlq = DeadLetterQueue(stream, settings.stream.dlq_topic)
        counts: dict[str, float] = {}

        def count(name: str, n: float = 1) -> None:
            counts[name] = counts.get(name, 0) + n

        def retry(kind, what, fn):
            return fn()

        assert validate_records([rec], store, VERSION, dlq, retry, count, max_seq=seq) == []
        assert counts["dlq"] == 1  # unknown under the batch's sequence, however late it runs
        assert len(validate_records([rec], store, VERSION, dlq, retry, count,
                                    max_seq=seq + 1)) == 1


def test_a_plan_reads_back_from_a_folder_or_a_jsonl_file(tmp_path: Path) -> None:
    from student.online.plan import PlanEntry

    entries = [PlanEntry(1, 0, 0, 16, "full", 0, 1, 3, {}),
               PlanEntry(2, 1, 0, 5, "partial", 1, 0, 3, {2: 1_700_000_000_000_000})]
    folder = PlanLog(tmp_path / "plan")
    for e in entries:
        folder.write(e)
    assert folder.entries() == entries and folder.entries(after=1) == entries[1:]
    jsonl = tmp_path / "plan.jsonl"
    jsonl.write_text("".join(json.dumps(e.to_json()) + "\n" for e in entries))
    assert PlanLog(jsonl).entries() == entries


def test_cli_has_the_plan_flags() -> None:
    from typer.testing import CliRunner

    from codistill.app.cli import app

    out = CliRunner().invoke(app, ["student", "online", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "--max-batch-wait-s" in out.output and "--replay-plan" in out.output
