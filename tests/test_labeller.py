"""The nearline labeller on the embedded stream and store, with the real MiniLM teacher.

A small home is precomputed (six code-search lists), then v2 impressions of *new*
queries showing *new* candidates (their texts stored first, as the server does) go
through the embedded log, with feedback and malformed messages mixed in.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from codistill.app.cli import app
from codistill.config import load_settings
from codistill.ids import candidate_id, query_id
from stores.base import VersionError
from stores.embedded import EmbeddedStore
from streaming.embedded import EmbeddedStream
from streaming.events import Feedback, Impression
from teacher.label import Labeller
from teacher.precompute import precompute
from tests.helpers.code_examples import examples

TOPIC = "ev"
NEW = {  # query -> the new code it was shown with (besides two precomputed candidates)
    "reverse a list in place": "def flip(xs):\n    xs.reverse()\n    return xs",
    "count words in a sentence": "def word_count(s):\n    return len(s.split())",
    "check whether a number is prime": "def is_prime(n):\n    return n > 1 and all(n % k for k in range(2, n))",
    "merge two dictionaries": "def merge(a, b):\n    return {**a, **b}",
    "average of a list of numbers": "def mean(xs):\n    return sum(xs) / len(xs)",
}
EXTRA = "def dedupe(xs):\n    return list(dict.fromkeys(xs))"  # shown with a precomputed query


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory):
    """A home whose current teacher reads 64 subwords (cheaper; the texts are short)."""
    return load_settings(home=tmp_path_factory.mktemp("home"), teacher={"max_seq_length": 64})


class Spy:
    """Wraps ``teacher.encode`` and records every text it was asked for."""

    def __init__(self, teacher, monkeypatch: pytest.MonkeyPatch) -> None:
        self.texts: list[str] = []
        real = teacher.encode

        def encode(texts, desc="encode"):
            self.texts.extend(texts)
            return real(texts, desc)

        monkeypatch.setattr(teacher, "encode", encode)


def impression(query: str, codes: list[str], n: int, age_s: float = 120.0) -> Impression:
    ids = [candidate_id(c) for c in codes]
    return Impression.v2(request_id=f"r{n}", query_id=query_id(query), query=query,
                         candidate_ids=ids, model_version="m1", unknown_candidate_ids=ids[:1],
                         event_time=datetime.now(UTC) - timedelta(seconds=age_s))


def send(stream: EmbeddedStream, events: list[Impression | Feedback | bytes]) -> None:
    for n, ev in enumerate(events):
        raw = ev if isinstance(ev, bytes) else ev.to_bytes()
        stream.send(TOPIC, f"k{n}", raw)
    stream.flush()


def new_events() -> list[Impression | Feedback | bytes]:
    old = examples()[0].candidates
    events: list[Impression | Feedback | bytes] = []
    for n, (query, code) in enumerate(NEW.items()):
        imp = impression(query, [code, old[n % 6], old[(n + 1) % 6]], n)
        events += [imp, Feedback(request_id=imp.request_id, candidate_id=imp.candidate_ids[0],
                                 action="click", position=1, event_time=imp.event_time)]
    known = examples()[1]  # precomputed: its label is there, one of its shown codes is new
    events.append(impression(known.query, [EXTRA, *known.candidates[:2]], 99))
    events += [b"not json", b'{"type": "impression", "schema_version": 2}']
    return events


@pytest.fixture
def env(teacher, tmp_path: Path):
    """(store, stream): the six lists precomputed, the new texts stored, events sent."""
    store = EmbeddedStore(tmp_path / "store")
    precompute(teacher, store, {"train": examples()}, progress=False)
    store.put_texts({candidate_id(c): c for c in [*NEW.values(), EXTRA]})
    stream = EmbeddedStream(tmp_path / "events", TOPIC, partitions=2)
    stream.create_topic(TOPIC, 2)
    send(stream, new_events())
    yield store, stream
    stream.close()
    store.close()


def labeller(teacher, store, stream, group: str = "g", **kw) -> Labeller:
    return Labeller(teacher, store, stream, TOPIC, group=group, **kw)


def test_labels_new_queries_and_candidates_once(teacher, env, monkeypatch) -> None:
    store, stream = env
    v = teacher.version
    seq0 = store.get_version(v).sequence
    spy = Spy(teacher, monkeypatch)
    with labeller(teacher, store, stream, batch_size=4) as lab:
        m = lab.metrics
        assert m.value("codistill_labeller_lag_events") == len(new_events()) == 13
        assert m.value("codistill_labeller_lag_seconds") == 0  # nothing labelled yet
        assert any(h.kind == "lease" and h.owner == lab.owner for h in store.holds(v))
        lab.step()
        assert 0 < m.value("codistill_labeller_lag_events") < 13
        assert m.value("codistill_labeller_lag_seconds") > 100  # events are 120 s old
        stats = lab.run(follow=False, max_idle_s=20)
        assert stats.caught_up and stats.events == 13
        assert m.value("codistill_labeller_lag_events") == 0
        assert m.value("codistill_labeller_lag_seconds") == 0
        assert m.value("codistill_labeller_events_total", kind="invalid") == 2
        assert m.value("codistill_labeller_events_total", kind="feedback") == 5
        assert m.value("codistill_labeller_events_total", kind="impression") == 6
        assert m.value("codistill_labeller_queries_labelled_total") == 5 == stats.queries_labelled
        assert m.value("codistill_labeller_candidates_embedded_total") == 6
        assert stats.queries_known == 1 and stats.missing_texts == 0
    assert not any(h.owner == lab.owner for h in store.holds(v))  # released on close
    assert store.get_version(v).sequence == seq0 + 5 + 6

    # only the new texts were encoded, each once: no precomputed query or candidate
    assert sorted(spy.texts) == sorted([*NEW, *NEW.values(), EXTRA])
    new_ids = [candidate_id(c) for c in [*NEW.values(), EXTRA]]
    emb, found = store.get_embeddings(v, new_ids)
    assert found.all()
    np.testing.assert_allclose(emb, teacher.encode([*NEW.values(), EXTRA]), atol=2e-3)

    events = [e for e in new_events() if isinstance(e, Impression)][:5]
    records = store.get_labels(v, [e.query_id for e in events])
    q_emb = teacher.encode(list(NEW))
    for ev, rec, qe in zip(events, records, q_emb, strict=True):
        assert rec is not None and rec.candidate_ids == ev.candidate_ids
        assert rec.logit_scale == teacher.logit_scale and rec.teacher_version == v
        np.testing.assert_allclose(rec.query_embedding, qe, atol=2e-3)
        cand, _ = store.get_embeddings(v, rec.candidate_ids)
        cos = cand @ qe / np.linalg.norm(cand, axis=1)  # raw cosines, not scaled
        np.testing.assert_allclose(rec.scores, cos, atol=2e-3)
        assert rec.scores.dtype == np.float32 and rec.soft_labels().argmax() == 0
    known = examples()[1]
    assert store.get_labels(v, [known.query_id])[0].candidate_ids == known.candidate_ids


def test_a_replay_writes_nothing(teacher, env, monkeypatch) -> None:
    store, stream = env
    v = teacher.version
    with labeller(teacher, store, stream) as lab:
        lab.run(max_idle_s=20)
    seq = store.get_version(v).sequence
    spy = Spy(teacher, monkeypatch)
    with labeller(teacher, store, stream) as lab:  # same group: resumes at its commits
        again = lab.run(max_idle_s=20)
    assert again.caught_up and again.events == 0
    with labeller(teacher, store, stream, group="fresh") as lab:  # from offset 0
        replay = lab.run(max_idle_s=20)
    assert replay.events == 13 and replay.queries_known == 6
    assert replay.queries_labelled == replay.candidates_embedded == 0
    assert store.get_version(v).sequence == seq and spy.texts == []


def test_follow_labels_new_events_until_sigterm(teacher, env, tmp_path: Path) -> None:
    store, stream = env
    seen: dict[str, object] = {}
    before = signal.getsignal(signal.SIGTERM)

    def wait(predicate) -> None:
        deadline = time.monotonic() + 60
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.05)

    def traffic(lab: Labeller) -> None:
        wait(lambda: lab.stats.events >= 13)
        with EmbeddedStream(tmp_path / "events", TOPIC, partitions=2) as producer:
            send(producer, [impression("sum of squares", [EXTRA, *NEW.values()], 7, age_s=0)])
        wait(lambda: lab.stats.queries_labelled >= 6)
        seen["handled"] = signal.getsignal(signal.SIGTERM) is not before
        if seen["handled"]:
            os.kill(os.getpid(), signal.SIGTERM)  # a clean stop: finish the batch, commit
        else:
            lab.stop()

    with labeller(teacher, store, stream) as lab:
        thread = threading.Thread(target=traffic, args=(lab,), daemon=True)
        thread.start()
        stats = lab.run(follow=True, poll_s=0.2)
        thread.join(10)
        assert seen["handled"] and signal.getsignal(signal.SIGTERM) is before
        assert (stats.events, stats.queries_labelled, stats.caught_up) == (14, 6, False)
        assert lab.metrics.value("codistill_labeller_lag_events") == 0
    assert store.has_labels(teacher.version, [query_id("sum of squares")]).all()


def test_a_candidate_without_text_waits_then_is_embedded(teacher, tmp_path, monkeypatch) -> None:
    store = EmbeddedStore(tmp_path / "store")
    precompute(teacher, store, {"train": examples()}, progress=False)
    stream = EmbeddedStream(tmp_path / "events", TOPIC, partitions=1)
    stream.create_topic(TOPIC, 1)
    v, old = teacher.version, examples()[0].candidates[0]
    late, never = "def late(x):\n    return x * 3", "def never(x):\n    return -x"
    with stream, store, labeller(teacher, store, stream, max_text_retries=1) as lab:
        send(stream, [impression("triple a number", [late, old], 1),
                      impression("negate a number", [never, old], 2)])
        assert lab.step() == 2  # no texts: both queries wait, nothing crashes
        assert lab.stats.missing_texts == 2 and lab.stats.queries_labelled == 0
        assert not store.has_embeddings(v, [candidate_id(late), candidate_id(never)]).any()
        store.put_texts({candidate_id(late): late})
        send(stream, [b"{}"])  # any later batch retries the lookups
        assert lab.step() == 1
        assert store.has_embeddings(v, [candidate_id(late)]).all()
        rec, gave_up = store.get_labels(v, [query_id("triple a number"), query_id("negate a number")])
        assert rec.candidate_ids == [candidate_id(late), candidate_id(old)]
        assert gave_up.candidate_ids == [candidate_id(old)]  # retried once, then left out
        assert lab.stats.missing_texts == 3 and lab.stats.candidates_without_text == 1
        assert lab.metrics.value("codistill_labeller_missing_text_total") == 3

        send(stream, [impression("halve a number", ["def half(x):\n    return x / 2", old], 3)])
        stats = lab.run(max_idle_s=20)  # caught up with the query waiting: labelled without it
        assert store.get_labels(v, [query_id("halve a number")])[0].candidate_ids == [
            candidate_id(old)]
        assert stats.caught_up and stats.candidates_without_text == 2


def test_refuses_a_version_the_store_lacks(teacher, tmp_path: Path) -> None:
    stream = EmbeddedStream(tmp_path / "events", TOPIC, partitions=1)
    stream.create_topic(TOPIC, 1)
    with EmbeddedStore(tmp_path / "empty") as store, stream:
        with pytest.raises(VersionError, match="teacher precompute"):
            labeller(teacher, store, stream)
        with pytest.raises(ValueError, match="cannot label"):
            labeller(teacher, store, stream, version="other-zs-0")


def test_cli_labels_and_prints_a_summary(settings, teacher, tmp_path: Path) -> None:
    home = tmp_path / "h"
    with EmbeddedStore(home / "store") as store:
        precompute(teacher, store, {"train": examples()}, progress=False)
        store.put_texts({candidate_id(c): c for c in [*NEW.values(), EXTRA]})
    with EmbeddedStream(home / "events", TOPIC) as stream:
        stream.create_topic(TOPIC, 2)
        send(stream, new_events())
    env = {"CODISTILL_TEACHER__MAX_SEQ_LENGTH": "64", "CODISTILL_STREAM__TOPIC": TOPIC,
           "CODISTILL_CONFIG": ""}
    (home / "teachers").mkdir(parents=True, exist_ok=True)
    for path in settings.teachers_dir.iterdir():  # the teacher's card, not its weights
        target = home / "teachers" / path.name
        if not target.exists():
            target.symlink_to(path)
    runner = CliRunner()
    res = runner.invoke(app, ["--home", str(home), "-q", "teacher", "label"], env=env)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["teacher_version"] == teacher.version and summary["caught_up"]
    assert (summary["events"], summary["queries_labelled"], summary["candidates_embedded"],
            summary["invalid"]) == (13, 5, 6, 2)
    assert summary["events_per_s"] > 0
    res = runner.invoke(app, ["--home", str(home), "teacher", "label", "--version", "nope"],
                        env=env)
    assert res.exit_code == 2 and "nope" in res.output
