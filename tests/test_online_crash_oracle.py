"""The crash oracle: SIGKILLs while a producer writes, judged by a replay of the plan.

A live trainer's batches depend on timing (what had arrived, what waited long
enough), so "the same weights as an uninterrupted run" has no fixed reference
while producers keep writing. The reference is the trainer's own durable plan:
a *fresh* trainer with an empty checkpoint folder that replays only that plan
over the same log (``replay_plan``) must end with bit-identical weights, and the
plan's ranges must cover each partition's consumed offsets with no gap and no
overlap. The fixed-log crash test stays in ``tests/test_online_trainer.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from stores import open_store
from streaming import open_stream
from student.online.checkpoint import LATEST
from student.online.plan import PlanLog, check_coverage
from tests.helpers.online import (
    ROOT,
    SMALL,
    assert_same_weights,
    end_offsets,
    fill_store,
    finish,
    make_stream,
    online_settings,
    produce,
    run_in_process,
    seeded_kill_delays,
    settings_env,
    start_trainer,
    student_weights,
    tiny_corpus,
    wait_for,
)

# appends generated requests to the embedded log in chunks, pausing between them
PRODUCER = """
import sys
from datetime import UTC, datetime
from codistill.config import load_settings
from streaming import open_stream
from tests.helpers.online import make_stream, produce_live, tiny_corpus
settings = load_settings()
gen = make_stream(tiny_corpus(), int(sys.argv[1]), seed=int(sys.argv[2]),
                  start=datetime(2026, 1, 1, 1, tzinfo=UTC))
with open_stream(settings.resolved_stream()) as stream:
    produce_live(stream, settings.stream.topic, gen, int(sys.argv[3]), float(sys.argv[4]))
"""

LIVE = {"name": "crashy", "batch_size": 16, "checkpoint_every": 3, "poll_interval_s": 0.05,
        "max_batch_wait_s": 0.2, **SMALL}
TRICKLE = 5  # records per append of the last phase: always fewer than a batch


def _planned(plan: Path) -> dict[str, int]:
    """The next offset the plan reaches on each partition it has an entry for."""
    covered = check_coverage(PlanLog(plan).entries())
    return {str(p): nxt for p, (_, nxt) in covered.items()}


def _trickle_to_a_caught_up_trainer(settings, plan: Path, log: Path) -> None:
    """A live trainer that has applied the whole log, then a few records at a time.

    The SIGKILLs above run while the producer is ahead, and a loaded machine may
    never catch up with it: then no batch is cut by ``max_batch_wait_s`` before the
    log's end. Here each append waits until the plan covers everything appended so
    far, so the trainer is caught up when the next few (fewer than ``batch_size``)
    arrive: only an expired wait can take them, and the next append lands behind
    that partial batch. It waits on the plan, not the clock, so a slow machine
    only makes it slower. The trainer is SIGKILLed at the end, while it waits.
    """
    topic = settings.stream.topic
    trickle = make_stream(tiny_corpus(), 12, seed=33,
                          start=datetime(2026, 1, 1, 2, tzinfo=UTC)).messages
    proc = start_trainer(settings, LIVE, log_path=log)
    try:
        with open_stream(settings.resolved_stream()) as stream:
            for i in range(0, len(trickle) + TRICKLE, TRICKLE):  # first: catch up
                for m in trickle[i - TRICKLE:i]:
                    stream.send(topic, m.key, m.value)
                stream.flush()
                ends = {p: o for p, o in end_offsets(stream, topic).items() if o}
                assert wait_for(lambda e=ends: proc.poll() is not None or _planned(plan) == e,
                                timeout=120) and proc.poll() is None, (
                    f"the plan reached {_planned(plan)}, not {ends}: {log.read_text()[-3000:]}")
    finally:
        proc.kill()
        finish(proc, log)


def _run_killed(settings, crash_at: str, log: Path) -> None:
    proc = start_trainer(settings, LIVE, crash_at=crash_at, log_path=log)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{crash_at} was never reached: {log.read_text()[-3000:]}") from None
    run = finish(proc, log)
    assert run.killed, (crash_at, run.returncode, run.log[-3000:])


def test_sigkills_under_a_live_producer_match_a_fresh_replay_of_the_plan(tmp_path: Path) -> None:
    settings = online_settings(tmp_path)
    with open_store(settings.resolved_store()) as store:
        fill_store(store, tiny_corpus())
    topic = settings.stream.topic
    with open_stream(settings.resolved_stream()) as stream:
        stream.ensure_topics()
        produce(stream, topic, make_stream(tiny_corpus(), 120, seed=31, malformed_rate=0.05))
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, "900", "32", "25", "0.5"],
                                cwd=ROOT, env=settings_env(settings))
    log = tmp_path / "crashy.log"
    try:
        # plan written / step not applied; step applied / no checkpoint; checkpoint renamed /
        # LATEST not switched; LATEST switched / offsets not committed
        for point in ("after_plan:4", "after_step:8", "before_latest:12", "after_plan:16",
                      "after_checkpoint:18"):
            _run_killed(settings, point, log)
            if point == "after_step:8":
                assert producer.poll() is None, "the producer finished before the kills began"
        latest = tmp_path / "online" / "crashy" / "checkpoints" / LATEST
        for delay in seeded_kill_delays(13, 2, 0.0, 0.5):  # seeded moments while it trains
            before = latest.read_text()
            proc = start_trainer(settings, LIVE, log_path=log)
            assert wait_for(lambda b=before: latest.read_text() != b, timeout=120), log.read_text()
            time.sleep(delay)
            proc.kill()
            finish(proc, log)
    finally:
        assert producer.wait(120) == 0
    plan = tmp_path / "online" / "crashy" / "checkpoints-plan"
    _trickle_to_a_caught_up_trainer(settings, plan, log)
    # nothing is written any more: one last run to the end of the log (it replays what
    # is pending)
    final, _ = run_in_process(settings, **{**LIVE, "until_end": True})
    with open_stream(settings.resolved_stream()) as stream:
        ends = end_offsets(stream, topic)
    assert final["offsets"] == ends and final["resumed_from"] is not None

    entries = PlanLog(plan).entries()
    assert len(entries) == final["batches"]
    covered = check_coverage(entries, starts={int(p): 0 for p in ends})
    assert {str(p): nxt for p, (_, nxt) in covered.items()} == ends
    assert any(e.kind == "partial" and e.end < ends[str(e.partition)] for e in entries), (
        "no timing-dependent partial batch: the oracle tested nothing the fixed log does not")

    replay, _ = run_in_process(settings, name="replay", until_end=False, replay_plan=str(plan))
    assert replay["resumed_from"] is None and replay["batches"] == final["batches"]
    assert replay["offsets"] == final["offsets"]
    assert_same_weights(student_weights(Path(replay["student_dir"])),
                        student_weights(Path(final["student_dir"])))
    for key in ("events_consumed", "valid_events", "dlq", "impressions_joined", "label_hits"):
        assert replay["counters"][key] == final["counters"][key], key
