"""Event-time join: windows, lateness, orphans, determinism and checkpoint/restore."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.events import Event, Feedback, Impression
from streaming.generator import QuerySpec, generate_stream
from streaming.join import JoinedImpression, Joiner
from streaming.partitioner import partition_for

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def imp(rid: str, t: float, cands: tuple[str, ...] = ("a", "b", "c")) -> Impression:
    return Impression(request_id=rid, query_id="q" + rid, query="find " + rid,
                      candidate_ids=list(cands), model_version="m1",
                      event_time=T0 + timedelta(seconds=t))


def fb(
    rid: str, t: float, cand: str = "a", action: str = "click", pos: int | None = None
) -> Feedback:
    position = pos if pos is not None else "abc".index(cand) + 1
    return Feedback(request_id=rid, candidate_id=cand, action=action, position=position,
                    event_time=T0 + timedelta(seconds=t))


def run(joiner: Joiner, events: list[Event], pop_every: int = 1) -> list[JoinedImpression]:
    out: list[JoinedImpression] = []
    for i, e in enumerate(events, 1):
        joiner.add(e)
        if i % pop_every == 0:
            out += joiner.pop_ready()
    return out + joiner.pop_ready()


def summary(joined: list[JoinedImpression]) -> list[tuple[str, list[tuple[str, str]]]]:
    return [(j.impression.request_id, [(f.candidate_id, f.action) for f in j.feedback])
            for j in joined]


def test_join_with_feedback_before_and_after_and_none() -> None:
    j = Joiner(window_s=10, allowed_lateness_s=2)
    events = [
        fb("r2", 3, "b"),  # before its impression
        imp("r1", 0), imp("r2", 1), fb("r1", 4, "a"), fb("r1", 5, "a", "accept"),
        imp("r3", 2),  # never gets feedback
        imp("r9", 30),  # moves the watermark to 28: windows ending <= 12 close
    ]
    out = run(j, events)
    assert summary(out) == [("r1", [("a", "click"), ("a", "accept")]), ("r2", [("b", "click")]),
                            ("r3", [])]
    assert out[0].clicked() == [True, False, False] and out[0].accepted() == [True, False, False]
    assert j.pending == 1 and j.watermark() == T0 + timedelta(seconds=28)
    assert j.watermark(partition=5) is None
    assert summary(j.flush()) == [("r9", [])]


def test_window_closes_strictly_after_the_watermark_passes_it() -> None:
    j = Joiner(window_s=10, allowed_lateness_s=5)
    j.add(imp("r1", 0))
    j.add(imp("r2", 15))  # watermark 10 = window end: not below yet
    assert j.pop_ready() == []
    j.add(fb("r1", 9, "c"))  # within lateness: still joins
    j.add(imp("r3", 15.000001))
    assert summary(j.pop_ready()) == [("r1", [("c", "click")])]


def test_late_orphan_and_late_impression_are_counted_and_dropped() -> None:
    j = Joiner(window_s=10, allowed_lateness_s=0)
    j.add(imp("r1", 0))
    j.add(fb("ghost", 1))  # its impression never comes
    j.add(imp("r2", 20))  # closes r1 (end 10) and expires the ghost feedback (1 + 10 < 20)
    assert summary(j.pop_ready()) == [("r1", [])]
    assert j.counters["orphan_feedback"] == 1
    j.add(fb("r1", 5))  # r1 already emitted
    assert j.counters["late_feedback"] == 1
    j.add(fb("r0", 15))  # waits for its impression...
    j.add(imp("r0", 0.5))  # ...whose window (0.5..10.5) closed before it arrived
    assert j.counters["late_impressions"] == 1 and j.counters["late_feedback"] == 2
    j.add(imp("r1", 0))  # a duplicate is not emitted twice
    assert j.counters["duplicate_impressions"] == 1
    j.add(fb("r2", 21, "b", pos=3))  # position does not match what was shown
    j.add(fb("r2", 22, "z", pos=1))
    j.add(fb("r2", 23, "b"))
    j.add(fb("r2", 23, "b"))  # exact duplicate
    assert j.counters["mismatched_feedback"] == 2 and j.counters["duplicate_feedback"] == 1
    assert summary(j.flush()) == [("r2", [("b", "click")])]


def test_output_is_ordered_by_event_time_then_request_id() -> None:
    j = Joiner(window_s=1, allowed_lateness_s=0)
    out = run(j, [imp("b", 1), imp("a", 1), imp("c", 0), imp("z", 100)], pop_every=10)
    assert [x.impression.request_id for x in out] == ["c", "a", "b"]


def test_feedback_is_sorted_whatever_the_arrival_order() -> None:
    events = [imp("r", 0), fb("r", 3, "b"), fb("r", 1, "a"), fb("r", 2, "c"), imp("end", 100)]
    a = run(Joiner(10, 1), events)
    b = run(Joiner(10, 1), [events[0], *reversed(events[1:4]), events[4]])
    assert summary(a) == summary(b) == [("r", [("a", "click"), ("c", "click"), ("b", "click")])]


# ----------------------------------------------------------- realistic, shuffled streams
QUERIES = [QuerySpec(f"q{i}", f"query {i}", [f"c{i}-{k}" for k in range(8)],
                     [1.0 if k == 0 else 0.0 for k in range(8)]) for i in range(25)]


def _stream(seed: int, delay_s: float, n: int = 300) -> list[Event]:
    return generate_stream(QUERIES, n, seed=seed, max_delivery_delay_s=delay_s,
                           max_feedback_delay_s=20.0, mean_interarrival_s=0.5).events


def _truth(events: list[Event]) -> dict[str, list[tuple[str, str]]]:
    by_rid: dict[str, list[Feedback]] = defaultdict(list)
    for e in events:
        if isinstance(e, Feedback):
            by_rid[e.request_id].append(e)
    return {rid: [(f.candidate_id, f.action) for f in
                  sorted(fs, key=lambda f: (f.event_time, f.position, f.action))]
            for rid, fs in by_rid.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounded_disorder_within_lateness_loses_nothing(seed: int) -> None:
    """Delivery delays <= allowed lateness and feedback within the window: an exact join."""
    events = _stream(seed, delay_s=4.0)
    j = Joiner(window_s=20.0, allowed_lateness_s=4.0)
    out = run(j, events, pop_every=7) + j.flush()
    truth = _truth(events)
    assert len(out) == sum(isinstance(e, Impression) for e in events)
    assert {x.impression.request_id: summary([x])[0][1] for x in out} == {
        x.impression.request_id: truth.get(x.impression.request_id, []) for x in out}
    assert all(v == 0 for v in j.counters.values()), j.counters
    times = [(x.impression.event_time, x.impression.request_id) for x in out]
    assert times == sorted(times)


def test_disorder_beyond_lateness_is_counted_not_crashing() -> None:
    events = _stream(3, delay_s=30.0)  # much later than the allowed lateness
    j = Joiner(window_s=20.0, allowed_lateness_s=1.0)
    out = run(j, events) + j.flush()
    n_imp = sum(isinstance(e, Impression) for e in events)
    n_fb = len(events) - n_imp
    kept = sum(len(x.feedback) for x in out)
    c = j.counters
    assert len(out) + c["late_impressions"] == n_imp
    assert kept + c["late_feedback"] + c["orphan_feedback"] == n_fb
    assert c["late_feedback"] + c["orphan_feedback"] > 0


@pytest.mark.parametrize("pop_every", [1, 5, 10_000])
def test_output_does_not_depend_on_when_pop_ready_is_called(pop_every: int) -> None:
    events = _stream(4, delay_s=15.0)
    ref = run(Joiner(10.0, 3.0), events, pop_every=1)
    ref_all = sorted(summary(ref))
    got = run(Joiner(10.0, 3.0), events, pop_every=pop_every)
    assert sorted(summary(got)) == ref_all


def _split_run(events: list[Event], cuts: list[int], window: float, lateness: float
               ) -> tuple[list[JoinedImpression], dict[str, int]]:
    """Run with a checkpoint (state -> JSON -> from_state) at every cut."""
    j = Joiner(window, lateness)
    out: list[JoinedImpression] = []
    for i, e in enumerate(events):
        if i in cuts:
            j = Joiner.from_state(json.loads(json.dumps(j.state())))
        j.add(e, partition=partition_for(e.request_id, 3))
        if i % 3 == 0:
            out += j.pop_ready()
    out += j.flush()
    return out, j.counters


@pytest.mark.parametrize("seed", [5, 6])
def test_split_restore_continue_equals_one_pass(seed: int) -> None:
    events = _stream(seed, delay_s=12.0, n=200)
    ref, ref_counters = _split_run(events, [], 10.0, 3.0)
    assert any(ref_counters.values())  # the stream exercises late / orphan paths too
    for cut in range(0, len(events), 23):
        out, counters = _split_run(events, [cut], 10.0, 3.0)
        assert out == ref and counters == ref_counters


@settings(max_examples=25, deadline=None, database=None)
@given(st.integers(0, 10_000), st.lists(st.integers(0, 400), max_size=6),
       st.floats(0, 20), st.floats(0, 10))
def test_split_restore_property(seed: int, cuts: list[int], window: float, lateness: float) -> None:
    events = _stream(seed, delay_s=10.0, n=120)
    rng = random.Random(seed)
    rng.shuffle(events[: len(events) // 10])  # some extra, unbounded disorder at the start
    assert _split_run(events, cuts, window, lateness) == _split_run(events, [], window, lateness)


def test_state_is_plain_json_and_versioned() -> None:
    j = Joiner(10, 2)
    for e in [fb("r2", 3, "b"), imp("r1", 0), fb("r1", 1), fb("r5", 19), imp("r3", 20)]:
        j.add(e)
    state = j.state()
    assert json.loads(json.dumps(state)) == state
    lane = state["lanes"]["0"]
    assert len(lane["pending"]) == 1 and len(state["ready"]) == 1
    assert lane["closed"] and len(lane["orphans"]) == 1
    restored = Joiner.from_state(state)
    assert restored.state() == state
    with pytest.raises(ValueError):
        Joiner.from_state({**state, "version": 99})


def test_partitions_have_their_own_watermark() -> None:
    """A trainer may read one partition far ahead of another: nothing becomes late."""
    events = _stream(8, delay_s=4.0, n=400)
    parts = [partition_for(e.request_id, 4) for e in events]
    in_order = Joiner(20.0, 4.0)
    ref = run(in_order, events, pop_every=50) + in_order.flush()
    # Partition by partition, each in its own (delivery) order: a very different interleaving.
    j = Joiner(20.0, 4.0)
    out: list[JoinedImpression] = []
    for p in (3, 1, 0, 2):
        for e, ep in zip(events, parts, strict=True):
            if ep == p:
                j.add(e, partition=p)
        out += j.pop_ready()
        j = Joiner.from_state(json.loads(json.dumps(j.state())))  # checkpoint between batches
    out += j.flush()
    assert sorted(summary(out)) == sorted(summary(ref))
    assert not any(j.counters.values())
    # One shared watermark for the same feed would have dropped most of partitions read later.
    single = Joiner(20.0, 4.0)
    for p in (3, 1, 0, 2):
        for e, ep in zip(events, parts, strict=True):
            if ep == p:
                single.add(e)
    single.flush()
    assert single.counters["late_impressions"] > 100


def test_advance_to_closes_an_idle_partitions_windows_and_is_checkpointed() -> None:
    """An idle partition's watermark is raised from outside; it never goes down."""
    j = Joiner(window_s=10, allowed_lateness_s=2)
    j.add(imp("r1", 0), partition=1)
    j.add(imp("r2", 100), partition=0)  # a busy partition's clock does not close partition 1
    assert j.pop_ready() == [] and j.pending == 2
    wm = j.watermarks_us()[0]
    assert wm is not None and j.watermarks_us() == {0: wm, 1: wm - 100_000_000}
    j.advance_to(1, 5_000_000 + wm - 100_000_000)  # T0 + 5 s: window [0, 10] still open
    assert j.pop_ready() == []
    restored = Joiner.from_state(json.loads(json.dumps(j.state())))
    for joiner in (j, restored):
        joiner.advance_to(1, wm)
        assert summary(joiner.pop_ready()) == [("r1", [])]
        assert joiner.watermark(1) == T0 + timedelta(seconds=98)
        joiner.advance_to(1, wm - 50_000_000)  # lower: ignored
        assert joiner.watermark(1) == T0 + timedelta(seconds=98)
        joiner.add(imp("r3", 50), partition=1)  # its window closed before it came: late
        joiner.add(fb("r1", 1), partition=1)  # r1 is long closed and forgotten: an orphan
        assert joiner.counters["late_impressions"] == 1
        assert joiner.counters["orphan_feedback"] == 1 and joiner.pop_ready() == []
    j.advance_to(7, wm)  # a partition never seen: created with that watermark
    assert j.watermark(7) == j.watermark(0) and j.state()["lanes"]["7"]["pending"] == []
