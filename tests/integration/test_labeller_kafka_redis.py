"""The nearline labeller through a real Kafka broker and a real Redis store (no mocks).

Built as ``codistill teacher label`` builds it (:func:`teacher.label.open_labeller`
from the settings), with ``/metrics`` served and scraped. The topic and the Redis
namespace are unique per test, so the session's services stay shared.
"""

from __future__ import annotations

import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from codistill.app.processes import free_port
from codistill.ids import candidate_id, query_id
from stores import open_configured_store
from streaming import open_stream
from streaming.events import Feedback, Impression
from teacher import workflow as wf
from teacher.label import open_labeller
from teacher.precompute import precompute
from tests.helpers.code_examples import examples
from tests.helpers.online import kafka_redis_settings

pytestmark = pytest.mark.integration

NEW = {
    "reverse a list in place": "def flip(xs):\n    xs.reverse()\n    return xs",
    "merge two dictionaries": "def merge(a, b):\n    return {**a, **b}",
    "average of a list of numbers": "def mean(xs):\n    return sum(xs) / len(xs)",
}


def test_labeller_on_kafka_and_redis(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> None:
    settings = kafka_redis_settings(tmp_path, kafka_bootstrap, redis_url, "labeller",
                                    partitions=2)
    settings.teacher.max_seq_length = 64
    settings.labeller.batch_size = 3
    settings.labeller.metrics_port = free_port()
    teacher = wf.open_teacher(settings, wf.ensure_current(settings), progress=False)
    v = teacher.version
    old = examples()[0].candidates
    with open_configured_store(settings) as store:
        precompute(teacher, store, {"train": examples()}, progress=False)
        store.put_texts({candidate_id(c): c for c in NEW.values()})  # the server's order
    stream = open_stream(settings.resolved_stream())
    stream.ensure_topics()
    sent = []
    for n, (query, code) in enumerate(NEW.items()):
        ids = [candidate_id(c) for c in (code, old[n], old[n + 1])]
        imp = Impression.v2(request_id=f"r{n}", query_id=query_id(query), query=query,
                            candidate_ids=ids, model_version="m1", unknown_candidate_ids=ids[:1],
                            event_time=datetime.now(UTC) - timedelta(seconds=60))
        sent.append(imp)
        stream.send(settings.stream.topic, imp.request_id, imp.to_bytes())
        fb = Feedback(request_id=imp.request_id, candidate_id=ids[0], action="click",
                      position=1, event_time=imp.event_time)
        stream.send(settings.stream.topic, imp.request_id, fb.to_bytes())
    stream.send(settings.stream.topic, "bad", b"\xff not json")
    stream.flush()
    stream.close()

    labeller, store, stream = open_labeller(settings)
    try:
        assert labeller.metrics.value("codistill_labeller_lag_events") == 7
        stats = labeller.run(follow=False, max_idle_s=60)
        url = f"http://127.0.0.1:{settings.labeller.metrics_port}/metrics"
        scraped = urllib.request.urlopen(url, timeout=5).read().decode()
        assert stats.caught_up and stats.events == 7 and stats.invalid == 1
        assert (stats.queries_labelled, stats.candidates_embedded) == (3, 3)
        assert f'codistill_labeller_lag_events{{teacher_version="{v}"}} 0.0' in scraped
        assert (f'codistill_labeller_queries_labelled_total{{teacher_version="{v}"}} 3.0'
                in scraped)
        records = store.get_labels(v, [e.query_id for e in sent])
        for ev, rec, qe in zip(sent, records, teacher.encode(list(NEW)), strict=True):
            assert rec is not None and rec.candidate_ids == ev.candidate_ids
            np.testing.assert_allclose(rec.query_embedding, qe, atol=2e-3)
            cand, found = store.get_embeddings(v, rec.candidate_ids)
            assert found.all()
            np.testing.assert_allclose(rec.scores, cand @ qe / np.linalg.norm(cand, axis=1),
                                       atol=2e-3)
        emb, _ = store.get_embeddings(v, [candidate_id(c) for c in NEW.values()])
        np.testing.assert_allclose(emb, teacher.encode(list(NEW.values())), atol=2e-3)
        seq = store.get_version(v).sequence
    finally:
        labeller.close()
        stream.close()
        store.close()

    settings.labeller.group = "labeller-replay"  # a new group reads everything again
    settings.labeller.metrics_port = None
    labeller, store, stream = open_labeller(settings)
    try:
        replay = labeller.run(follow=False, max_idle_s=60)
        assert replay.caught_up and replay.events == 7
        assert replay.queries_labelled == replay.candidates_embedded == 0
        assert store.get_version(v).sequence == seq
    finally:
        labeller.close()
        stream.close()
        store.close()
