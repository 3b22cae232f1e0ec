"""The crash oracle with the nearline labeller running: SIGKILLs while a producer writes
queries and candidates the teacher never saw, judged by a fresh replay of the plan.

A small real home: the MiniLM teacher (64 subwords) precomputes six code-search lists,
and *all* traffic is for new queries, each shown with a new function (its text stored
before the events naming it, as the server does; no vector) and precomputed ones. A
``codistill teacher label --follow`` subprocess fills in vectors and labels while a live
trainer (``labeller: True``) is SIGKILLed at hook points and seeded moments and resumed.
The labeller starts only once the trainer has planned its first batch, so it is behind
then for certain (that batch records its new candidates as ``pending``); a few
impressions name a candidate with no text anywhere, which no labeller can embed.

Judged at the end: every new candidate and query got its vector and label; no event but
those textless ones was dead-lettered as ``unknown_candidate``; some batch recorded
pending candidates and some trained on a label the labeller wrote; the plan covers every
partition without gap or overlap; and a fresh trainer replaying the plan ends with the
same counters and bit-identical weights (``tests/test_online_crash_oracle.py`` without
a labeller).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from codistill.config import Settings, load_settings
from codistill.ids import candidate_id, query_id
from stores import open_store
from streaming import open_stream
from streaming.dlq import decode_dead_letter
from streaming.events import UNKNOWN_CANDIDATE, Feedback, Impression, parse_event
from streaming.generator import GeneratedStream, QuerySpec, generate_stream
from student.online.checkpoint import LATEST
from student.online.plan import PlanLog, check_coverage
from tests.helpers.code_examples import CODE, QUERIES, examples
from tests.helpers.online import (
    ROOT,
    SMALL,
    assert_same_weights,
    end_offsets,
    finish,
    produce,
    read_topic,
    run_in_process,
    seeded_kill_delays,
    settings_env,
    start_trainer,
    student_weights,
    wait_for,
)

pytestmark = pytest.mark.slow

NEW = {  # query the teacher never saw -> a new function shown with it (its relevant one)
    # wave A: texts stored and events written before any trainer or labeller runs
    "reverse a list in place": "def flip(xs):\n    xs.reverse()\n    return xs",
    "count words in a sentence": "def word_count(s):\n    return len(s.split())",
    "check whether a number is prime":
        "def is_prime(n):\n    return n > 1 and all(n % k for k in range(2, n))",
    "merge two dictionaries": "def merge(a, b):\n    return {**a, **b}",
    "average of a list of numbers": "def mean(xs):\n    return sum(xs) / len(xs)",
    "remove duplicates keeping order": "def dedupe(xs):\n    return list(dict.fromkeys(xs))",
    # wave B: stored by the producer subprocess, just before its events
    "open a sqlite database": "def connect(path):\n    return sqlite3.connect(path)",
    "sleep for a second": "def pause():\n    time.sleep(1)",
    "flatten a nested list": "def flatten(xss):\n    return [x for xs in xss for x in xs]",
    "square every number": "def squares(xs):\n    return [x * x for x in xs]",
    "get the last element": "def last(xs):\n    return xs[-1]",
    "join strings with commas": "def csv_line(items):\n    return ','.join(items)",
}
WAVE_A = 6
BOGUS = "cnotextanywhere000000000"  # no stored text: the labeller cannot embed it, ever
BOGUS_QUERY = "a query about nothing in particular"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
LIVE = {"name": "crashy", "batch_size": 16, "checkpoint_every": 3, "poll_interval_s": 0.05,
        "max_batch_wait_s": 0.2, "labeller": True, "label_wait_s": 0.3, **SMALL}

# stores wave B's texts (as the server does, before it emits an impression naming them),
# then appends a seeded stream over all new queries in chunks, pausing between them
PRODUCER = """
import sys
from codistill.config import load_settings
from stores import open_store
from streaming import open_stream
from tests.helpers.online import produce_live
from tests.test_online_crash_oracle_labeller import new_texts, new_stream
settings = load_settings()
with open_store(settings.resolved_store()) as store:
    store.put_texts(new_texts(slice(6, None)))
gen = new_stream(slice(None), int(sys.argv[1]), seed=int(sys.argv[2]), minutes=2)
with open_stream(settings.resolved_stream()) as stream:
    produce_live(stream, settings.stream.topic, gen, int(sys.argv[3]), float(sys.argv[4]))
"""


def new_texts(which: slice) -> dict[str, str]:
    """Candidate id -> code of the new functions of ``which`` queries."""
    return {candidate_id(code): code for code in list(NEW.values())[which]}


def new_stream(which: slice, n_requests: int, seed: int, minutes: float = 0) -> GeneratedStream:
    """v2 impressions + clicks for the ``which`` new queries: their new function (relevant)
    and three precomputed ones, three of the four shown (so lists of one query differ)."""
    old = [candidate_id(code) for code in CODE.values()]
    specs = [QuerySpec(query_id(q), q, [candidate_id(code), *(old[(i + k) % 6] for k in range(3))],
                       [1.0, 0.0, 0.0, 0.0])
             for i, (q, code) in enumerate(NEW.items())][which]
    return generate_stream(specs, n_requests, seed, schema_version=2, max_shown=3,
                           max_feedback_delay_s=20.0, max_delivery_delay_s=3.0,
                           start=T0 + timedelta(minutes=minutes))


def _home(tmp_path: Path) -> tuple[Settings, str]:
    """Six lists precomputed by the real teacher; wave A's texts and events, plus a few
    impressions naming the textless candidate, written."""
    from teacher import workflow as wf
    from teacher.precompute import precompute

    settings = load_settings(home=tmp_path, threads=1, teacher={"max_seq_length": 64})
    teacher = wf.open_teacher(settings, wf.ensure_current(settings), progress=False)
    with open_store(settings.resolved_store()) as store:
        precompute(teacher, store, {"train": examples()}, progress=False)  # makes it current
        version = teacher.version
        assert store.current() == version
        store.put_texts(new_texts(slice(None, WAVE_A)))
        # nothing the stream shows is labelled yet: every label hit is the labeller's
        assert not store.has_labels(teacher.version,
                                    [query_id(q) for q in [*NEW, BOGUS_QUERY]]).any()
        assert not store.has_embeddings(teacher.version, [*new_texts(slice(None)), BOGUS]).any()
    assert not set(NEW) & set(QUERIES.values())
    del teacher
    with open_stream(settings.resolved_stream()) as stream:
        stream.ensure_topics()
        produce(stream, settings.stream.topic, new_stream(slice(None, WAVE_A), 60, seed=41))
        old = [candidate_id(code) for code in CODE.values()]
        for n in range(3):
            imp = Impression.v2(request_id=f"bogus-{n}", query_id=query_id(BOGUS_QUERY),
                                query=BOGUS_QUERY, candidate_ids=[BOGUS, old[n], old[n + 1]],
                                model_version="m1", event_time=T0 + timedelta(seconds=20 * n))
            stream.send(settings.stream.topic, imp.request_id, imp.to_bytes())
        stream.flush()
    return settings, version


def _labeller_command() -> list[str]:
    script = Path(sys.executable).with_name("codistill")
    found = str(script) if script.exists() else shutil.which("codistill")
    assert found, "the codistill console script is not installed next to the interpreter"
    return [found, "-q", "teacher", "label", "--follow"]


def _env(settings: Settings) -> dict[str, str]:
    return {**settings_env(settings), "CODISTILL_CONFIG": "",
            "CODISTILL_TEACHER__MAX_SEQ_LENGTH": str(settings.teacher.max_seq_length)}


def _run_killed(settings: Settings, crash_at: str, log: Path,
                started: Any = None) -> None:
    """A trainer run to its crash hook; ``started(plan_entries)`` is polled meanwhile."""
    proc = start_trainer(settings, LIVE, crash_at=crash_at, log_path=log)
    try:
        if started is not None:
            assert wait_for(lambda: proc.poll() is not None or started(), timeout=120), (
                log.read_text()[-3000:])
        proc.wait(120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{crash_at} was never reached: {log.read_text()[-3000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    run = finish(proc, log)
    assert run.killed, (crash_at, run.returncode, run.log[-3000:])


def _log_facts(settings: Settings) -> tuple[list[Any], set[str], set[str]]:
    """The events topic's records, the candidate ids (with a text) and query ids it names."""
    with open_stream(settings.resolved_stream()) as stream:
        records = read_topic(stream, settings.stream.topic)
    cids: set[str] = set()
    qids: set[str] = set()
    for rec in records:
        event = parse_event(rec.value)
        if isinstance(event, Feedback):
            cids.add(event.candidate_id)
        else:
            cids.update(event.candidate_ids)
            qids.add(event.query_id)
    return records, cids - {BOGUS}, qids


def test_sigkills_with_the_labeller_behind_match_a_fresh_replay(tmp_path: Path) -> None:
    settings, version = _home(tmp_path)
    plan = tmp_path / "online" / "crashy" / "checkpoints-plan"
    log, lab_out = tmp_path / "crashy.log", tmp_path / "labeller.out"
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, "500", "42", "20", "0.5"],
                                cwd=ROOT, env=_env(settings))
    labeller: subprocess.Popen[bytes] | None = None

    def start_labeller() -> bool:  # once the trainer has planned a batch: it is behind then
        nonlocal labeller
        if labeller is None and PlanLog(plan).entries():
            with open(lab_out, "wb") as out, open(tmp_path / "labeller.log", "ab") as err:
                labeller = subprocess.Popen(_labeller_command(), cwd=ROOT, env=_env(settings),
                                            stdout=out, stderr=err)
        return labeller is not None

    try:
        # plan written / step not applied; step applied / no checkpoint; checkpoint renamed /
        # LATEST not switched; LATEST switched / offsets not committed
        _run_killed(settings, "after_plan:4", log, started=start_labeller)
        assert labeller is not None, "the trainer died before it planned a batch"
        for point in ("after_step:8", "before_latest:12", "after_checkpoint:15"):
            _run_killed(settings, point, log)
            if point == "after_step:8":
                assert producer.poll() is None, "the producer finished before the kills began"
            assert labeller.poll() is None, (labeller.returncode,
                                             (tmp_path / "labeller.log").read_text()[-3000:])
        latest = tmp_path / "online" / "crashy" / "checkpoints" / LATEST
        for delay in seeded_kill_delays(43, 1, 0.0, 0.5):  # a seeded moment while it trains
            before = latest.read_text()
            proc = start_trainer(settings, LIVE, log_path=log)
            assert wait_for(lambda b=before: latest.read_text() != b, timeout=120), log.read_text()
            time.sleep(delay)
            proc.kill()
            finish(proc, log)
        assert producer.wait(120) == 0
        # nothing is written to the log any more (the labeller still writes to the store):
        # one last live run to the end of the log (it replays what is recorded, then plans)
        final, _ = run_in_process(settings, **{**LIVE, "until_end": True})

        records, cids, qids = _log_facts(settings)
        group, topic = settings.labeller.group, settings.stream.topic
        with open_store(settings.resolved_store()) as store, \
                open_stream(settings.resolved_stream()) as stream:
            ends = end_offsets(stream, topic)

            def caught_up() -> bool:  # it read (committed) the whole log and labelled it
                return (all((stream.committed(group, topic, int(p)) or 0) == end
                            for p, end in ends.items())
                        and bool(store.has_embeddings(version, sorted(cids)).all())
                        and bool(store.has_labels(version, sorted(qids - {query_id(BOGUS_QUERY)}))
                                 .all()))

            assert wait_for(caught_up, timeout=120, interval=0.2) and labeller.poll() is None, (
                (tmp_path / "labeller.log").read_text()[-3000:])
        labeller.send_signal(signal.SIGTERM)  # a clean stop: gives up on the textless one
        assert labeller.wait(60) == 0, (tmp_path / "labeller.log").read_text()[-3000:]
    finally:
        for proc in (producer, labeller):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)

    # the labeller labelled everything the log shows, once each
    summary = json.loads(lab_out.read_text())
    assert summary["teacher_version"] == version and summary["events"] == len(records)
    assert summary["candidates_embedded"] == len(NEW) and summary["candidates_without_text"] >= 1
    assert summary["queries_labelled"] == len(qids) == len(NEW) + 1
    with open_store(settings.resolved_store()) as store:
        assert store.has_labels(version, sorted(qids)).all()
        assert not store.has_embeddings(version, [BOGUS]).any()

    with open_stream(settings.resolved_stream()) as stream:
        letters = [decode_dead_letter(r.value)
                   for r in read_topic(stream, settings.stream.dlq_topic)]
    assert final["offsets"] == ends and final["resumed_from"] is not None

    # only the textless candidate's impressions are dead letters (repeats after a kill
    # carry the same source position); a new candidate never is, labeller behind or not
    bogus = {(r.partition, r.offset) for r in records
             if BOGUS in getattr(parse_event(r.value), "candidate_ids", [])}
    assert len(bogus) == 3
    dead = {(d.source_partition, d.source_offset) for d in letters if d.code == UNKNOWN_CANDIDATE}
    assert dead == bogus, sorted(dead - bogus)[:10]
    assert {d.code for d in letters} == {UNKNOWN_CANDIDATE}
    counters = final["counters"]
    assert counters["dlq"] == len(bogus)

    # the plan covers each partition without gap or overlap
    entries = PlanLog(plan).entries()
    assert len(entries) == final["batches"]
    covered = check_coverage(entries, starts={int(p): 0 for p in ends})
    assert {str(p): nxt for p, (_, nxt) in covered.items()} == ends

    # the labeller was behind: batches trained around new candidates it had not embedded
    # yet (and never around the textless one) ...
    pending = {c for e in entries for c in e.pending}
    assert pending and pending <= set(new_texts(slice(None))), pending
    assert counters["pending_candidates"] == sum(len(e.pending) for e in entries) > 0
    # ... and later ones trained on labels it wrote (no query of the stream was precomputed)
    # (and on its vectors: the other lists of a labelled query are scored from them)
    assert counters.get("label_hits", 0) > 0 and counters.get("label_extended", 0) > 0, counters

    # the oracle: a fresh trainer replaying the plan, with the store grown since
    replay, _ = run_in_process(settings, name="replay", until_end=False, labeller=True,
                               label_wait_s=0.3, replay_plan=str(plan))
    assert replay["resumed_from"] is None and replay["batches"] == final["batches"]
    assert replay["offsets"] == final["offsets"]
    for key in ("events_consumed", "valid_events", "dlq", "impressions_joined", "label_hits",
                "label_misses", "label_misaligned", "label_extended", "pending_candidates"):
        assert replay["counters"].get(key) == counters.get(key), key
    vocab = {name: json.loads((Path(run["student_dir"]) / "config.json").read_text())["tokenizer"]
             for name, run in (("final", final), ("replay", replay))}
    assert vocab["replay"] == vocab["final"], (
        "the replay fitted its student's vocabulary on other texts than the run did: a new "
        "trainer fits it on every candidate the version holds when it starts "
        "(student/online/bootstrap.py vocabulary_texts), and the labeller has added some since")
    assert_same_weights(student_weights(Path(replay["student_dir"])),
                        student_weights(Path(final["student_dir"])))
