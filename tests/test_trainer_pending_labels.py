"""A nearline labeller behind the trainer: new candidates wait or are trained around, never
dead-lettered, and the plan records which (so a replay decides the same).

Queries the teacher never saw arrive with candidates the store has the text of (the
server stores it before the impression) but no teacher vector yet. Without
``online.labeller`` such an event is a dead letter (``unknown_candidate``), which was
right when every candidate came from precompute; with a labeller it is only early.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from codistill.ids import candidate_id, query_id
from stores import open_store
from streaming import open_stream
from streaming.generator import QuerySpec
from tests.helpers.online import (
    DIM,
    VERSION,
    Corpus,
    fill_store,
    make_stream,
    online_settings,
    produce,
    run_in_process,
    tiny_corpus,
)

NEW = {  # shown with the tiny corpus' candidates; texts in the store, no vectors yet
    "open a sqlite database": "def connect(path):\n    return sqlite3.connect(path)",
    "sleep for a second": "def pause():\n    time.sleep(1)",
}
BOGUS = "cnotastoredcandidate0000"  # no text anywhere: no labeller can ever embed it


def _home(tmp_path: Path, bogus: bool = True) -> tuple[object, list[str]]:
    settings = online_settings(tmp_path)
    corpus = tiny_corpus()
    new_ids = [candidate_id(c) for c in NEW.values()]
    queries = [QuerySpec(query_id(q), q, [nid, *corpus.queries[i].candidate_ids[:3]],
                         [1.0, 0.0, 0.0, 0.0]) for i, (q, nid) in enumerate(zip(NEW, new_ids,
                                                                                 strict=True))]
    if bogus:
        q0 = corpus.queries[0]
        queries.append(QuerySpec("qbogus", "a query", [BOGUS, *q0.candidate_ids[:2]],
                                 [1.0, 0.0, 0.0]))
    with open_store(settings.resolved_store()) as store:
        fill_store(store, corpus)
        store.put_texts(dict(zip(new_ids, NEW.values(), strict=True)))
    mixed = Corpus(corpus.queries + queries, corpus.texts, corpus.gold)
    with open_stream(settings.resolved_stream()) as stream:
        stream.ensure_topics()
        produce(stream, settings.stream.topic, make_stream(mixed, 120, seed=3))
    return settings, new_ids


def _impressions_naming(settings: object, ids: set[str]) -> int:
    from streaming.events import Impression, parse_event
    from tests.helpers.online import read_topic

    with open_stream(settings.resolved_stream()) as stream:  # type: ignore[attr-defined]
        records = read_topic(stream, settings.stream.topic)  # type: ignore[attr-defined]
    events = [parse_event(r.value) for r in records]
    return sum(isinstance(e, Impression) and bool(ids & set(e.candidate_ids)) for e in events)


def test_without_a_labeller_unknown_candidates_are_dead_letters(tmp_path: Path) -> None:
    settings, new_ids = _home(tmp_path, bogus=False)
    summary, _ = run_in_process(settings, name="nolab")
    assert summary["counters"]["dlq"] >= _impressions_naming(settings, set(new_ids)) > 0


def test_pending_candidates_are_trained_around_and_recorded_bogus_ones_dead_lettered(
        tmp_path: Path) -> None:
    settings, new_ids = _home(tmp_path)
    summary, trainer = run_in_process(settings, name="lab", labeller=True, label_wait_s=0.0)
    counters = summary["counters"]
    bogus_events = _impressions_naming(settings, {BOGUS})
    assert bogus_events > 0 and counters["dlq"] >= bogus_events  # + clicks on the bogus gold
    entries = trainer.plan.entries()
    recorded = {c for e in entries for c in e.pending}
    assert recorded == set(new_ids)  # the labeller's backlog, and nothing else
    assert counters["pending_candidates"] == sum(len(e.pending) for e in entries) > 0

    # the vectors arrive later: a replay of the plan still decides as the run did
    with open_store(settings.resolved_store()) as store:
        store.put_embeddings(VERSION, new_ids, np.ones((len(new_ids), DIM), np.float32))
    replay, _ = run_in_process(settings, name="lab-replay", labeller=True, label_wait_s=0.0,
                               replay_plan=str(trainer.plan.root))
    for key in ("dlq", "valid_events", "pending_candidates", "impressions_joined"):
        assert replay["counters"].get(key) == counters.get(key), key


def test_planning_waits_for_the_labeller_within_label_wait_s(tmp_path: Path) -> None:
    settings, new_ids = _home(tmp_path, bogus=False)

    def labeller() -> None:  # writes the vectors while the trainer waits on the first batch
        time.sleep(0.5)
        with open_store(settings.resolved_store()) as store:
            store.put_embeddings(VERSION, new_ids, np.ones((len(new_ids), DIM), np.float32))

    thread = threading.Thread(target=labeller)
    thread.start()
    t0 = time.monotonic()
    summary, trainer = run_in_process(settings, name="wait", labeller=True, label_wait_s=20.0,
                                      poll_interval_s=0.05)
    thread.join()
    entries = trainer.plan.entries()
    assert time.monotonic() - t0 < 20 and all(not e.pending for e in entries)
    assert summary["counters"].get("dlq", 0) == 0
    assert summary["counters"].get("pending_candidates", 0) == 0
