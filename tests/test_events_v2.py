"""Event schema v2, rolled out readers first: every reader takes v1 and v2, v3 is refused."""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from streaming import SUPPORTED_SCHEMA_VERSIONS, Feedback, Impression, InvalidEvent, parse_event
from streaming.base import Record
from streaming.dlq import DeadLetterQueue, Rejection, decode_dead_letter, validate
from streaming.embedded import EmbeddedStream
from streaming.events import V2_IMPRESSION_FIELDS
from streaming.generator import QuerySpec, generate_stream, rank_propensities
from streaming.join import Joiner

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
V1_KEYS = ["schema_version", "request_id", "event_time", "type", "query_id", "query",
           "candidate_ids", "model_version"]


def imp(rid: str = "r1", t: float = 0.0, version: int = 1, cands: tuple[str, ...] = ("a", "b", "c"),
        **v2: object) -> Impression:
    return Impression(schema_version=version, request_id=rid, query_id="q" + rid,
                      query="find " + rid, candidate_ids=list(cands), model_version="m1",
                      event_time=T0 + timedelta(seconds=t), **v2)


def fb(rid: str, t: float, cand: str = "a", version: int = 1, action: str = "click") -> Feedback:
    return Feedback(schema_version=version, request_id=rid, candidate_id=cand, action=action,
                    position="abc".index(cand) + 1, event_time=T0 + timedelta(seconds=t))


def doc(**changes: object) -> dict:
    """A v2 impression document with ``changes`` applied (``...`` removes a key)."""
    d = json.loads(imp(version=2, propensities=[0.9, 0.5, 0.25], teams=["A", "B", None],
                       unknown_candidate_ids=["c"]).to_bytes())
    d.update(changes)
    return {k: v for k, v in d.items() if v is not ...}


# ---------------------------------------------------------------------------- parse_event
def test_v1_bytes_are_unchanged_and_round_trip() -> None:
    v1 = imp()
    assert list(json.loads(v1.to_bytes())) == V1_KEYS  # no v2 key on the wire, same order
    assert list(v1.model_dump(mode="json")) == V1_KEYS  # nor in the joiner's state
    back = parse_event(v1.to_bytes())
    assert back == v1 and back.schema_version == 1
    assert (back.unknown_candidate_ids, back.propensities, back.teams) == ([], None, None)


def test_v2_round_trip_keeps_every_field() -> None:
    v2 = imp(version=2, unknown_candidate_ids=["b"], propensities=[1.0, 0.5, 1e-9],
             teams=["A", None, "B"])
    assert list(json.loads(v2.to_bytes())) == [*V1_KEYS, *V2_IMPRESSION_FIELDS]
    back = parse_event(v2.to_bytes())
    assert back == v2 and back.schema_version == 2 and back.teams == ["A", None, "B"]
    bare = imp(version=2)  # every v2 field is optional
    assert parse_event(bare.to_bytes()) == bare
    f2 = Feedback.v2(request_id="r1", candidate_id="a", action="click", position=1,
                     event_time=T0)
    assert f2.schema_version == 2 and parse_event(f2.to_bytes()) == f2
    assert sorted(SUPPORTED_SCHEMA_VERSIONS) == [1, 2]


def test_a_v1_message_carrying_v2_fields_keeps_its_v1_meaning() -> None:
    for extra in ({"unknown_candidate_ids": ["a"], "propensities": [0.5] * 3, "teams": ["A"] * 3},
                  {"unknown_candidate_ids": ["zz", "zz"], "propensities": "junk", "teams": 7}):
        raw = json.dumps(doc(schema_version=1, **extra)).encode()
        ev = parse_event(raw)  # ignored like any unknown field, even when invalid for v2
        assert ev == imp() and ev.schema_version == 1
        assert "propensities" not in json.loads(ev.to_bytes())
    missing = doc()
    del missing["schema_version"]  # absent means 1
    assert parse_event(json.dumps(missing).encode()) == imp()


@pytest.mark.parametrize("version", [3, 4, 99, 0, -1])
def test_other_versions_are_rejected_for_the_dlq(version: int) -> None:
    for d in (doc(schema_version=version), {**json.loads(fb("r", 0).to_bytes()),
                                            "schema_version": version}):
        with pytest.raises(InvalidEvent) as info:
            parse_event(json.dumps(d).encode())
        assert info.value.code == "unsupported_version" and "'schema_version'" in info.value.reason
        got = validate(json.dumps(d).encode())
        assert isinstance(got, Rejection) and got.code == "unsupported_version"


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"unknown_candidate_ids": ["zz"]}, "unknown_candidate_ids", "'zz'"),
        ({"unknown_candidate_ids": ["a", "a"]}, "unknown_candidate_ids", "'a' is repeated"),
        ({"unknown_candidate_ids": [""]}, "unknown_candidate_ids.0", ""),
        ({"unknown_candidate_ids": "a"}, "unknown_candidate_ids", ""),
        ({"propensities": [0.5, 0.5]}, "propensities", "one entry per candidate"),
        ({"propensities": [0.5, 0.0, 0.5]}, "propensities.1", "greater than 0"),
        ({"propensities": [0.5, 1.5, 0.5]}, "propensities.1", "less than or equal to 1"),
        ({"propensities": [0.5, -0.1, 0.5]}, "propensities.1", ""),
        ({"propensities": [0.5, math.nan, 0.5]}, "propensities.1", "finite"),
        ({"propensities": [0.5, math.inf, 0.5]}, "propensities.1", ""),
        ({"propensities": [0.5, "x", 0.5]}, "propensities.1", ""),
        ({"propensities": 0.5}, "propensities", ""),
        ({"teams": ["A", "B"]}, "teams", "one entry per candidate"),
        ({"teams": ["A", "", None]}, "teams.1", ""),
        ({"teams": ["A", "x" * 33, None]}, "teams.1", "32"),
        ({"teams": ["A", 1, None]}, "teams.1", ""),
    ],
)
def test_bad_v2_fields_are_schema_errors_naming_the_field(
    changes: dict, field: str, words: str
) -> None:
    raw = json.dumps(doc(**changes)).encode()
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    assert info.value.code == "schema"
    assert f"field '{field}'" in info.value.reason and words in info.value.reason, info.value.reason
    got = validate(raw)
    assert isinstance(got, Rejection) and got.code == "schema"


def test_writers_default_to_v1_and_must_ask_for_v2() -> None:
    assert imp().schema_version == 1  # readers first: nothing writes v2 by accident
    for name, value in (("unknown_candidate_ids", ["a"]), ("propensities", [1.0] * 3),
                        ("teams", ["A"] * 3)):
        with pytest.raises(ValidationError, match=f"{name}[\\s\\S]*schema version 2"):
            imp(**{name: value})
    assert imp(unknown_candidate_ids=[], propensities=None, teams=None) == imp()  # defaults: v1
    v2 = Impression.v2(request_id="r1", query_id="qr1", query="find r1", model_version="m1",
                       candidate_ids=["a", "b", "c"], event_time=T0, propensities=[1.0] * 3)
    assert v2 == imp(version=2, propensities=[1.0] * 3)
    with pytest.raises(ValidationError, match="unsupported version 3"):
        imp(version=3)


# ------------------------------------------------------------------------------ properties
ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def v2_impressions(draw: st.DrawFn) -> Impression:
    cands = draw(st.lists(ids, min_size=1, max_size=8, unique=True))
    n = len(cands)
    probs = st.floats(0.0, 1.0, exclude_min=True, allow_nan=False)
    labels = st.none() | st.text(min_size=1, max_size=32)
    return Impression.v2(
        request_id=draw(ids), query_id=draw(ids), query=draw(st.text(min_size=1, max_size=20)),
        candidate_ids=cands, model_version=draw(ids),
        event_time=draw(st.datetimes(min_value=datetime(1990, 1, 1),
                                     max_value=datetime(2100, 1, 1), timezones=st.just(UTC))),
        unknown_candidate_ids=draw(st.lists(st.sampled_from(cands), unique=True)),
        propensities=draw(st.none() | st.lists(probs, min_size=n, max_size=n)),
        teams=draw(st.none() | st.lists(labels, min_size=n, max_size=n)),
    )


@settings(max_examples=300, deadline=None, database=None)
@given(v2_impressions())
def test_any_valid_v2_impression_round_trips(event: Impression) -> None:
    back = parse_event(event.to_bytes())
    assert back == event and back.schema_version == 2
    assert parse_event(back.to_bytes()).to_bytes() == event.to_bytes()


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(v2_impressions(), st.sampled_from(V2_IMPRESSION_FIELDS), st.data())
def test_mutated_v2_fields_raise_only_invalid_event(
    event: Impression, name: str, data: st.DataObject
) -> None:
    d = json.loads(event.to_bytes())
    if isinstance(d[name], list) and d[name] and data.draw(st.booleans()):
        d[name][data.draw(st.integers(0, len(d[name]) - 1))] = data.draw(json_values)
    else:
        d[name] = data.draw(json_values | ids | st.lists(ids, max_size=9))
    raw = json.dumps(d).encode()
    try:
        ev = parse_event(raw)
    except InvalidEvent as exc:
        assert exc.code == "schema" and f"'{name}" in exc.reason, exc.reason
        assert isinstance(validate(raw), Rejection)
    else:  # the mutation happened to be valid: then it reads back as written
        assert isinstance(ev, Impression) and ev.schema_version == 2
        assert parse_event(ev.to_bytes()) == ev


# ---------------------------------------------------------------------------------- joiner
def test_one_joiner_joins_a_mix_of_v1_and_v2_and_checkpoints_it() -> None:
    events = [
        imp("r1", 0), fb("r1", 1, "b", version=2),
        imp("r2", 1, version=2, unknown_candidate_ids=["c"], propensities=[0.9, 0.4, 0.1],
            teams=["A", "B", None]),
        fb("r2", 2, "a"), fb("r2", 3, "c", version=2, action="accept"),
        imp("r3", 2, version=2),
        imp("r9", 40),  # closes the first three windows
    ]
    straight, split = Joiner(window_s=10, allowed_lateness_s=2), Joiner(10, 2)
    for e in events:  # ``split`` is checkpointed through JSON before every event
        straight.add(e)
        split = Joiner.from_state(json.loads(json.dumps(split.state())))
        split.add(e)
    for j in (straight, split):
        out = j.pop_ready()
        assert [(o.impression.request_id, o.impression.schema_version) for o in out] == [
            ("r1", 1), ("r2", 2), ("r3", 2)]
        assert out[0].clicked() == [False, True, False]
        assert out[1].clicked() == [True, False, True] and out[1].accepted() == [
            False, False, True]
        assert out[1].impression == events[2]  # v2 fields survive the checkpoint
        assert j.counters["mismatched_feedback"] == 0


# -------------------------------------------------------------------------------------- DLQ
def _queries(n: int = 20, k: int = 8) -> list[QuerySpec]:
    return [QuerySpec(f"q{i}", f"query number {i}", [f"c{i}-{j}" for j in range(k)],
                      [2.0 if j == 0 else (1.0 if j == 1 else 0.0) for j in range(k)])
            for i in range(n)]


@pytest.fixture
def stream(tmp_path: Path) -> EmbeddedStream:
    s = EmbeddedStream(tmp_path / "events", topic="ev", dlq_topic="ev.dlq", partitions=3)
    s.ensure_topics()
    yield s
    s.close()


def _read_all(s: EmbeddedStream, topic: str) -> list[Record]:
    out: list[Record] = []
    for p in s.partitions(topic):
        offset = 0
        while records := s.read(topic, p, offset, 100):
            out.extend(records)
            offset = records[-1].offset + 1
    return out


def test_dlq_routes_a_salted_mix_of_v1_and_v2_streams(stream: EmbeddedStream) -> None:
    qs = _queries()
    known = {c for q in qs for c in q.candidate_ids}
    gens = [generate_stream(qs, 300, seed=s, malformed_rate=0.25, schema_version=v)
            for s, v in ((1, 1), (2, 2))]
    for g in gens:
        for m in g.messages:
            stream.send("ev", m.key, m.value)
    stream.send("ev", "r-v3", json.dumps(doc(schema_version=3)).encode())
    stream.flush()
    registry = CollectorRegistry()
    dlq = DeadLetterQueue(stream, "ev.dlq", registry=registry)

    def lookup(candidate_ids: list[str]) -> np.ndarray:
        return np.array([c in known for c in candidate_ids])

    accepted = [e for r in _read_all(stream, "ev") if (e := dlq.check(r, lookup)) is not None]
    stream.flush()
    want = [e for g in gens for e in g.events]
    assert sorted(e.to_bytes() for e in accepted) == sorted(e.to_bytes() for e in want)
    assert Counter(e.schema_version for e in accepted) == Counter(e.schema_version for e in want)
    letters = [decode_dead_letter(r.value) for r in _read_all(stream, "ev.dlq")]
    malformed = Counter((m.kind, m.value) for g in gens for m in g.malformed)
    assert Counter((d.code, d.raw) for d in letters if d.code != "unsupported_version") == malformed
    assert any("'propensities" in d.reason for d in letters)  # v2-only breakage is caught
    counts = sum((g.counts for g in gens), Counter())
    for code in ("bad_json", "schema", "unknown_candidate"):
        got = registry.get_sample_value("codistill_dlq_events_total", {"reason": code})
        assert got == counts[code] > 0
    assert registry.get_sample_value("codistill_dlq_events_total",
                                     {"reason": "unsupported_version"}) == 1


def test_declared_unknown_candidates_are_not_checked_against_the_store() -> None:
    asked: list[list[str]] = []

    def lookup(candidate_ids: list[str]) -> list[bool]:
        asked.append(candidate_ids)
        return [c in {"a"} for c in candidate_ids]

    declared = imp(version=2, unknown_candidate_ids=["b", "c"])
    assert validate(declared.to_bytes(), lookup) == declared and asked == [["a"]]
    partly = imp(version=2, unknown_candidate_ids=["c"])
    got = validate(partly.to_bytes(), lookup)
    assert isinstance(got, Rejection) and got.code == "unknown_candidate"
    assert got.reason.endswith(": b")  # only the undeclared one is named
    assert validate(imp(cands=("b",), version=2, unknown_candidate_ids=["b"]).to_bytes(),
                    lambda ids: (_ for _ in ()).throw(AssertionError(ids))).schema_version == 2
    v1 = validate(imp().to_bytes(), lookup)  # v1: every id is checked, as before
    assert isinstance(v1, Rejection) and "b, c" in v1.reason


# ---------------------------------------------------------------------------- generator
def test_generator_v2_is_the_v1_stream_plus_propensities() -> None:
    qs = _queries()
    v1 = generate_stream(qs, 400, seed=3, max_shown=5)
    v2 = generate_stream(qs, 400, seed=3, max_shown=5, schema_version=2)
    assert [m.value for m in generate_stream(qs, 400, seed=3, max_shown=5,
                                             schema_version=1).messages] == [
        m.value for m in v1.messages]
    assert len(v1.events) == len(v2.events)
    for a, b in zip(v1.events, v2.events, strict=True):
        assert b.schema_version == 2 and a.schema_version == 1
        if isinstance(b, Impression):
            assert b.propensities is not None and len(b.propensities) == len(b.candidate_ids)
            assert b.teams is None and b.unknown_candidate_ids == []
            b = b.model_copy(update={"propensities": None})
        assert a == b.model_copy(update={"schema_version": 1})
    with pytest.raises(ValueError, match="schema_version"):
        generate_stream(qs, 1, schema_version=3)


def test_generator_propensities_are_the_rankers_shown_at_rank_probabilities() -> None:
    rel = [2.0, 1.0, 1.0, 0.0]
    q = QuerySpec("q", "one query", ["w", "x", "y", "z"], rel)
    gen = generate_stream([q], 4000, seed=9, schema_version=2, ranking_noise=0.8)
    seen: Counter[tuple[str, int]] = Counter()
    logged: dict[tuple[str, int], float] = {}
    for e in gen.events:
        if isinstance(e, Impression):
            for r, (c, p) in enumerate(zip(e.candidate_ids, e.propensities or [], strict=True)):
                seen[c, r] += 1
                assert logged.setdefault((c, r), p) == p  # a function of (query, item, rank)
    n = seen.total() / 4
    for key, p in logged.items():
        assert abs(seen[key] / n - p) < 0.035, (key, seen[key] / n, p)
    table = np.array(rank_propensities(rel, 0.8, 4))
    np.testing.assert_allclose(table.sum(axis=0), 1.0, atol=1e-9)  # each rank holds one item
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-9)  # each item sits somewhere
    assert table[1, 0] == pytest.approx(table[2, 0])  # equal relevance, equal chances


# --------------------------------------------------------------------- the trainer's path
class _Store:
    """The one store call the trainer's validator makes."""

    def __init__(self, known: set[str]) -> None:
        self.known = known

    def has_embeddings(self, version: str, ids: list[str], max_seq: int | None = None
                       ) -> np.ndarray:
        return np.array([c in self.known for c in ids])


def _trainer_validate(events: list, known: set[str]) -> tuple[list, Counter[str], list[bytes]]:
    """The trainer's ``validate_records`` on ``events`` over a store knowing ``known``:
    the valid (record, event) pairs, its counters, and what went to the DLQ."""
    from student.online.reader import validate_records

    dead: list[bytes] = []

    class _Producer:
        def send(self, topic: str, key: str, value: bytes) -> None:
            dead.append(value)

    records = [Record("ev", 0, i, e.request_id, e.to_bytes(), 0) for i, e in enumerate(events)]
    counts: Counter[str] = Counter()
    dlq = DeadLetterQueue(_Producer(), "ev.dlq", registry=CollectorRegistry())
    valid = validate_records(records, _Store(known), "t1", dlq, lambda _kind, _what, fn: fn(),
                             lambda name, n=1: counts.update({name: n}))
    return valid, counts, dead


def test_the_online_trainers_reader_and_batcher_take_v1_and_v2() -> None:
    from student.online.batching import build_batch

    events = [imp("r1", 0), fb("r1", 1, "b"),
              imp("r2", 1, version=2, unknown_candidate_ids=["c"], propensities=[0.5] * 3),
              fb("r2", 2, "a", version=2), imp("r9", 40, version=2, cands=("a", "b"))]
    valid, counts, dead = _trainer_validate(events, known={"a", "b"})
    # The r1 impression (v1) names "c", which the store lacks: dead-lettered as
    # before; r2 (v2) declared it unknown, so it passes.
    assert [ev.request_id for _, ev in valid] == ["r1", "r2", "r2", "r9"]
    assert counts["dlq"] == 1 and counts["valid_events"] == 4
    joiner = Joiner(10, 2)
    for _, ev in valid:
        joiner.add(ev)
    ready = joiner.pop_ready()
    assert [j.impression.request_id for j in ready] == ["r2"]
    batch = build_batch(ready, {}, {"a": "def a(): pass", "b": "def b(): pass"})
    assert batch.candidate_ids == [["a", "b"]] and batch.stats.text_misses == 1
    assert batch.clicks.tolist() == [[1.0, 0.0]]


def test_a_click_on_a_candidate_the_server_declared_unknown_is_not_dead_lettered() -> None:
    """The server ranks a new candidate with its fallback and lists it as unknown; a
    click on it is real feedback, and the server says so (v2 ``unknown_candidate``),
    because the store lacks the id until the teacher embeds it."""
    events = [imp("r1", 0, version=2, unknown_candidate_ids=["c"]),
              fb("r1", 1, "c", version=2).model_copy(update={"unknown_candidate": True})]
    valid, counts, dead = _trainer_validate(events, known={"a", "b"})
    assert [type(ev).__name__ for _, ev in valid] == ["Impression", "Feedback"]
    assert counts["dlq"] == 0 and dead == []
    joiner = Joiner(10, 2)
    for _, ev in valid:
        joiner.add(ev)
    (joined,) = joiner.flush()
    assert joined.clicked() == [False, False, True]


def test_feedback_unknown_candidate_is_a_v2_field() -> None:
    flagged = Feedback.v2(request_id="r", candidate_id="c", action="click", position=1,
                          event_time=T0, unknown_candidate=True)
    assert parse_event(flagged.to_bytes()).unknown_candidate is True
    with pytest.raises(ValueError, match="schema version 2 field"):
        Feedback(request_id="r", candidate_id="c", action="click", position=1, event_time=T0,
                 unknown_candidate=True)
    v1 = json.loads(fb("r1", 0).to_bytes())
    assert "unknown_candidate" not in v1  # v1 bytes unchanged
    v1["unknown_candidate"] = True  # a v1 message keeps its v1 meaning
    assert parse_event(json.dumps(v1).encode()).unknown_candidate is False


# ------------------------------------------------------------------- feedback propensity
def test_v2_feedback_carries_a_logged_propensity_and_v1_drops_it() -> None:
    v2 = Feedback(schema_version=2, request_id="r1", candidate_id="b", action="click",
                  position=2, propensity=0.5, event_time=T0)
    assert parse_event(v2.to_bytes()) == v2 and parse_event(v2.to_bytes()).propensity == 0.5
    d = json.loads(v2.to_bytes())
    d["schema_version"] = 1  # a v1 reader ignored the field: it means nothing in v1
    assert parse_event(json.dumps(d).encode()).propensity is None
    assert "propensity" not in json.loads(fb("r1", 0.0).to_bytes())  # v1 bytes unchanged
    for bad in (0.0, 1.5, float("nan")):
        d = json.loads(v2.to_bytes())
        d["propensity"] = bad
        with pytest.raises(InvalidEvent, match="propensity"):
            parse_event(json.dumps(d).encode())
    with pytest.raises(ValidationError, match="schema version 2 field"):
        Feedback(request_id="r1", candidate_id="b", action="click", position=2,
                 propensity=0.5, event_time=T0)


def test_the_batch_carries_the_propensity_a_click_logged_nan_elsewhere() -> None:
    from streaming.join import JoinedImpression
    from student.online.batching import build_batch

    shown = imp("r1", 0, version=2)
    clicks = [Feedback(schema_version=2, request_id="r1", candidate_id="b", action="click",
                       position=2, propensity=0.4, event_time=T0),
              fb("r1", 1, "c", version=2)]  # no propensity logged: the loss uses the rank
    batch = build_batch([JoinedImpression(shown, clicks)], {},
                        {c: f"def {c}(): pass" for c in "abc"})
    props = batch.propensities.tolist()[0]
    assert math.isnan(props[0]) and props[1] == pytest.approx(0.4) and math.isnan(props[2])
    assert batch.clicks.tolist() == [[0.0, 1.0, 1.0]]
