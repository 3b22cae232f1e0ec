"""A candidate vector that vanishes from the store mid-training: dropped and counted, no crash.

A query-only (``asym-bow``) student scores against the teacher's stored candidate
vectors. Events naming a candidate the version does not know are dead-lettered
when their batch is read, but the joiner holds impressions until their window
closes - across batches and across restarts, in the checkpoint. A vector deleted
behind the store's back in between (a Redis evicting keys, a hand-edited embedded
store) is gone when the impression is finally trained on. As with a candidate
whose *text* is missing, the candidate is dropped from its row and counted
(``embedding_misses``), and the trainer goes on; it used to stop with a raw
``MissingCandidateError`` traceback, and every restart hit the same impression.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from codistill.config import Settings
from stores import open_store
from streaming import open_stream
from streaming.events import Impression
from streaming.join import JoinedImpression
from student.asym import AsymmetricBowStudent, MissingCandidateError, StoreCandidates
from student.bow import BowConfig
from student.online import JoinedBatch, OnlineLearner
from student.tokenizer import SubwordTokenizer
from tests.helpers.online import (
    DIM,
    VERSION,
    Corpus,
    end_offsets,
    fill_store,
    make_stream,
    online_settings,
    produce,
    run_in_process,
    synthetic_records,
    tiny_corpus,
)


def _asym_warm_start(settings: Settings, corpus: Corpus, out: Path) -> Path:
    with open_store(settings.resolved_store()) as store:
        tokenizer = SubwordTokenizer(512).fit(list(corpus.texts.values()))
        student = AsymmetricBowStudent(tokenizer, VERSION, BowConfig(dim=16, out_dim=DIM),
                                       candidate_source=StoreCandidates(store, VERSION))
        student.save(out)
    return out


def test_a_candidate_vector_deleted_mid_training_is_dropped_and_counted(tmp_path: Path) -> None:
    settings = online_settings(tmp_path)
    corpus = tiny_corpus()
    with open_store(settings.resolved_store()) as store:
        fill_store(store, corpus)
        db_path = store.db_path
    with open_stream(settings.resolved_stream()) as stream:
        stream.ensure_topics()
        produce(stream, settings.stream.topic, make_stream(corpus, 150, seed=7))
    warm = _asym_warm_start(settings, corpus, tmp_path / "warm")
    run = {"name": "asym-miss", "init_student": str(warm), "alpha": 1.0}

    # a few batches: their impressions are validated (every candidate known) and many
    # still wait in the joiner, saved in the checkpoint
    first, trainer = run_in_process(settings, **run, max_batches=3)
    assert first["counters"].get("dlq", 0) == 0 and first["batches"] == 3
    gone = corpus.gold[corpus.queries[0].query_id]
    waiting = [item["impression"] for lane in trainer.joiner.state()["lanes"].values()
               for item in lane["pending"] if gone in item["impression"]["candidate_ids"]]
    assert waiting, "no impression naming the candidate waits in the joiner"

    with sqlite3.connect(db_path) as conn:  # behind the store's back: counts unchanged
        deleted = conn.execute("DELETE FROM embeddings WHERE version = ? AND id = ?",
                               (VERSION, gone)).rowcount
    assert deleted == 1

    final, _ = run_in_process(settings, **run)
    with open_stream(settings.resolved_stream()) as stream:
        assert final["offsets"] == end_offsets(stream, settings.stream.topic)
    counters = final["counters"]
    # the waiting impressions lose that one candidate each; later events naming it are
    # dead-lettered as unknown when read, as for a candidate never precomputed
    assert counters["embedding_misses"] == len(waiting), counters
    assert counters.get("text_misses", 0) == 0 and counters["dlq"] > 0
    assert counters["label_hits"] == counters["impressions_joined"] - counters.get(
        "skipped_impressions", 0)
    assert final["optimizer_steps"] > first["optimizer_steps"]


def test_the_learner_drops_candidates_the_batch_marks_without_a_vector(tmp_path: Path) -> None:
    """In-process: ``JoinedBatch.embedded`` False drops the candidate; unchecked, the source raises."""
    settings = online_settings(tmp_path)
    corpus = tiny_corpus()
    with open_store(settings.resolved_store()) as store:
        fill_store(store, corpus)
        gone = corpus.queries[0].candidate_ids[2]
        with sqlite3.connect(store.db_path) as conn:
            conn.execute("DELETE FROM embeddings WHERE version = ? AND id = ?", (VERSION, gone))
        student = AsymmetricBowStudent(
            SubwordTokenizer(512).fit(list(corpus.texts.values())), VERSION,
            BowConfig(dim=16, out_dim=DIM), candidate_source=StoreCandidates(store, VERSION))
        learner = OnlineLearner(student, lr=0.01, alpha=1.0)
        q = corpus.queries[0]
        imp = Impression(request_id="r1", query_id=q.query_id, query=q.query,
                         candidate_ids=list(q.candidate_ids), model_version="m",
                         event_time=datetime(2026, 1, 1, tzinfo=UTC))
        labels = {q.query_id: synthetic_records(corpus)[0]}
        texts = {c: corpus.texts[c] for c in q.candidate_ids}
        batch = JoinedBatch.fetch(
            [JoinedImpression(imp)], lambda qids: [labels[i] for i in qids],
            lambda cids: [texts[c] for c in cids],
            lambda cids: list(store.has_embeddings(VERSION, cids)))
        assert batch.missing_vectors() == [gone]
        stats = learner.learn_many(batch)
        assert stats.stepped and stats.embedding_misses == 1
        assert stats.batch.text_misses == 0 and stats.batch.label_hits == 1
        with pytest.raises(MissingCandidateError, match=VERSION):  # not checked: the source's error
            learner.learn_many(JoinedBatch(batch.ready, batch.labels, batch.texts))
