"""Event-time join of impressions with their feedback.

Feedback may arrive before or after its impression (different services,
different partitions' lag, retries). The :class:`Joiner` buffers both and emits
an impression with *all* its feedback once its window has closed in event time:

* watermark = max event time seen - ``allowed_lateness_s``;
* an impression is ready when ``event_time + window_s < watermark``; one with
  no feedback is emitted with an empty list ("shown, not clicked");
* feedback for an impression already emitted is ``late_feedback``; feedback
  whose impression has not shown up once ``feedback time + window_s`` falls
  below the watermark is ``orphan_feedback``; both are counted and dropped, as
  are impressions that arrive after their own window closed (``late_impressions``).

**Watermarks are per partition** (``add(event, partition)``). A request's
impression and feedback share a partition (the topic is keyed by request id), so
each partition is joined on its own clock: a trainer that reads partition 0 far
ahead of partition 1 makes nothing in partition 1 late. With one partition (the
default) this is the textbook single watermark.

All decisions are taken in :meth:`Joiner.add`, from each partition's event
sequence alone, so the joined output (as a set) depends neither on when
:meth:`Joiner.pop_ready` is called nor on how partitions are interleaved, and
``Joiner.from_state(j.state())`` continues exactly where ``j`` stopped: the
trainer stores the state in its checkpoint next to the offsets it covers.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from streaming.events import Event, Feedback, Impression

STATE_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_COUNTERS = ("late_feedback", "orphan_feedback", "late_impressions", "duplicate_impressions",
             "duplicate_feedback", "mismatched_feedback")


def _us(t: datetime) -> int:
    """Exact integer microseconds since the epoch (no float rounding in comparisons)."""
    return (t - _EPOCH) // _US


@dataclass(frozen=True)
class JoinedImpression:
    """An impression with all its feedback, sorted by (event time, position, action)."""

    impression: Impression
    feedback: list[Feedback] = field(default_factory=list)

    def _flags(self, actions: set[str]) -> list[bool]:
        hit = {f.candidate_id for f in self.feedback if f.action in actions}
        return [c in hit for c in self.impression.candidate_ids]

    def clicked(self) -> list[bool]:
        """Per shown candidate (impression order): clicked or accepted (an accept implies use)."""
        return self._flags({"click", "accept"})

    def accepted(self) -> list[bool]:
        return self._flags({"accept"})

    def logged_propensities(self) -> list[float | None]:
        """Per shown candidate: the examination propensity its click logged (v2), else None."""
        logged = {f.candidate_id: f.propensity for f in self.feedback
                  if f.action in ("click", "accept") and f.propensity is not None}
        return [logged.get(c) for c in self.impression.candidate_ids]


class _Lane:
    """Join state of one partition: its own watermark, buffers and timers."""

    def __init__(self, joiner: Joiner) -> None:
        self.j = joiner
        self.max_time: int | None = None
        self.pending: dict[str, Impression] = {}
        self.attached: dict[str, list[Feedback]] = {}
        self.due: list[tuple[int, str]] = []  # heap of (window end, request id) of pending
        self.orphans: dict[str, dict[int, Feedback]] = {}  # request id -> {seq: feedback}
        self.orphan_due: list[tuple[int, int, str]] = []  # heap of (expiry, seq, request id)
        self.closed: dict[str, int] = {}  # emitted request id -> window end (spots late ones)
        self.closed_due: list[tuple[int, str]] = []

    def watermark(self) -> int | None:
        return None if self.max_time is None else self.max_time - self.j._lateness

    def add(self, event: Event) -> None:
        t = _us(event.event_time)
        self.max_time = t if self.max_time is None else max(self.max_time, t)
        if isinstance(event, Impression):
            self._add_impression(event, t)
        else:
            self._add_feedback(event, t)
        self.advance()

    def _add_impression(self, imp: Impression, t: int) -> None:
        rid, counters = imp.request_id, self.j.counters
        if rid in self.pending or rid in self.closed:
            counters["duplicate_impressions"] += 1
            return
        end = t + self.j._window
        early = self.orphans.pop(rid, {})
        wm = self.watermark()
        if wm is not None and end < wm:  # its window closed before it arrived
            counters["late_impressions"] += 1
            counters["late_feedback"] += len(early)
            self._close(rid, end)
            return
        self.pending[rid] = imp
        self.attached[rid] = []
        heapq.heappush(self.due, (end, rid))
        for fb in early.values():
            self._attach(imp, fb)

    def _attach(self, imp: Impression, fb: Feedback) -> None:
        pos = fb.position - 1
        if pos >= len(imp.candidate_ids) or imp.candidate_ids[pos] != fb.candidate_id:
            self.j.counters["mismatched_feedback"] += 1
            return
        attached = self.attached[imp.request_id]
        if fb in attached:
            self.j.counters["duplicate_feedback"] += 1
            return
        attached.append(fb)

    def _add_feedback(self, fb: Feedback, t: int) -> None:
        rid = fb.request_id
        if rid in self.pending:
            self._attach(self.pending[rid], fb)
        elif rid in self.closed:
            self.j.counters["late_feedback"] += 1
        else:
            self.j._seq += 1
            self.orphans.setdefault(rid, {})[self.j._seq] = fb
            heapq.heappush(self.orphan_due, (t + self.j._window, self.j._seq, rid))

    def _close(self, rid: str, end: int) -> None:
        self.closed[rid] = end
        heapq.heappush(self.closed_due, (end, rid))

    def advance(self) -> None:
        """Close every window below the watermark, expire orphans and old closed ids."""
        wm = self.watermark()
        if wm is None:
            return
        closing: list[tuple[int, str]] = []
        while self.due and self.due[0][0] < wm:
            closing.append(heapq.heappop(self.due))
        for end, rid in closing:
            self._emit(rid, end)
        while self.orphan_due and self.orphan_due[0][0] < wm:
            _, seq, rid = heapq.heappop(self.orphan_due)
            waiting = self.orphans.get(rid)
            if waiting is not None and waiting.pop(seq, None) is not None:
                self.j.counters["orphan_feedback"] += 1
                if not waiting:
                    del self.orphans[rid]
        # Remember emitted ids for one more window + lateness: feedback later than that
        # is classified as an orphan (dropped either way), and memory stays bounded.
        horizon = wm - self.j._window - self.j._lateness
        while self.closed_due and self.closed_due[0][0] < horizon:
            _, rid = heapq.heappop(self.closed_due)
            del self.closed[rid]

    def _emit(self, rid: str, end: int) -> None:
        imp = self.pending.pop(rid)
        fbs = sorted(self.attached.pop(rid),
                     key=lambda f: (f.event_time, f.position, f.action, f.dwell_ms or 0.0))
        self.j._ready.append(JoinedImpression(imp, fbs))
        self._close(rid, end)

    def flush(self) -> None:
        for end, rid in sorted(self.due):
            self._emit(rid, end)
        self.due = []
        self.j.counters["orphan_feedback"] += sum(len(v) for v in self.orphans.values())
        self.orphans, self.orphan_due = {}, []

    def state(self) -> dict[str, Any]:
        def dump(e: Event) -> dict[str, Any]:
            return e.model_dump(mode="json")

        return {
            "max_time_us": self.max_time,
            "pending": [
                {"impression": dump(self.pending[rid]), "end": end,
                 "feedback": [dump(f) for f in self.attached[rid]]}
                for end, rid in sorted(self.due)
            ],
            "orphans": [
                {"seq": seq, "expiry": exp, "feedback": dump(self.orphans[rid][seq])}
                for exp, seq, rid in sorted(self.orphan_due)
                if seq in self.orphans.get(rid, {})
            ],
            "closed": sorted([end, rid] for rid, end in self.closed.items()),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.max_time = state["max_time_us"]
        for item in state["pending"]:
            imp = Impression.model_validate(item["impression"])
            self.pending[imp.request_id] = imp
            self.attached[imp.request_id] = [Feedback.model_validate(f) for f in item["feedback"]]
            self.due.append((item["end"], imp.request_id))
        for item in state["orphans"]:
            fb = Feedback.model_validate(item["feedback"])
            self.orphans.setdefault(fb.request_id, {})[item["seq"]] = fb
            self.orphan_due.append((item["expiry"], item["seq"], fb.request_id))
        for end, rid in state["closed"]:
            self.closed[rid] = end
            self.closed_due.append((end, rid))
        for heap in (self.due, self.orphan_due, self.closed_due):
            heapq.heapify(heap)


class Joiner:
    """Buffers impressions and feedback; emits joined impressions in event-time order."""

    def __init__(self, window_s: float, allowed_lateness_s: float) -> None:
        if window_s < 0 or allowed_lateness_s < 0:
            raise ValueError("window_s and allowed_lateness_s must be >= 0")
        self.window_s, self.allowed_lateness_s = float(window_s), float(allowed_lateness_s)
        self._window = round(self.window_s * 1e6)
        self._lateness = round(self.allowed_lateness_s * 1e6)
        self._lanes: dict[int, _Lane] = {}
        self._ready: list[JoinedImpression] = []
        self._seq = 0
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    def _lane(self, partition: int) -> _Lane:
        lane = self._lanes.get(partition)
        if lane is None:
            lane = self._lanes[partition] = _Lane(self)
        return lane

    def add(self, event: Event, partition: int = 0) -> None:
        """Take one event from ``partition`` (the record's partition; 0 for a single stream)."""
        self._lane(partition).add(event)

    def watermark(self, partition: int = 0) -> datetime | None:
        lane = self._lanes.get(partition)
        wm = None if lane is None else lane.watermark()
        return None if wm is None else _EPOCH + wm * _US

    def watermarks_us(self) -> dict[int, int | None]:
        """Each partition's watermark in exact integer microseconds since the epoch.

        Only partitions the joiner has seen (an event, or :meth:`advance_to`); None
        for one without an event time yet. The integer form is what a caller that
        records watermarks (the online trainer's plan) compares and stores, with no
        datetime or float rounding.
        """
        return {p: lane.watermark() for p, lane in self._lanes.items()}

    def advance_to(self, partition: int, watermark_us: int) -> None:
        """Raise ``partition``'s watermark to ``watermark_us`` and close the windows it passes.

        A partition's watermark moves only with its own events, so on a partition
        that has gone *idle* (no traffic) the impressions already there would wait
        forever for their windows to close. A caller that knows the partition is
        idle - the online trainer, once it has had nothing waiting there for
        ``max_batch_wait_s`` - raises its watermark to the busy partitions' minimum
        (Flink's idleness). The advance is recorded as the partition's latest event
        time (``watermark_us + allowed_lateness``), so :meth:`state` carries it like
        an event-driven advance, and events arriving there later below it are late.
        A watermark already at or past ``watermark_us`` is left as it is (never lowered).

        Parameters
        ----------
        partition
            The partition (a new one is created, as by :meth:`add`).
        watermark_us
            The new watermark, integer microseconds since the epoch.

        Examples
        --------
        >>> j = Joiner(window_s=10, allowed_lateness_s=2)
        >>> j.advance_to(3, 5_000_000)
        >>> j.watermark(3)
        datetime.datetime(1970, 1, 1, 0, 0, 5, tzinfo=datetime.timezone.utc)
        >>> j.advance_to(3, 1_000_000)  # never lowered
        >>> j.watermarks_us()
        {3: 5000000}
        """
        lane = self._lane(partition)
        wanted = watermark_us + self._lateness
        if lane.max_time is None or lane.max_time < wanted:
            lane.max_time = wanted
            lane.advance()

    @property
    def pending(self) -> int:
        """Impressions waiting for their window to close (all partitions)."""
        return sum(len(lane.pending) for lane in self._lanes.values())

    def pop_ready(self) -> list[JoinedImpression]:
        """Joined impressions whose window closed, by (impression time, request id)."""
        out = sorted(self._ready, key=lambda j: (j.impression.event_time, j.impression.request_id))
        self._ready = []
        return out

    def flush(self) -> list[JoinedImpression]:
        """End of input: emit every pending impression now; waiting feedback becomes orphan."""
        for _, lane in sorted(self._lanes.items()):
            lane.flush()
        return self.pop_ready()

    # -- checkpointing -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-serializable snapshot of everything buffered (for the trainer's checkpoint)."""
        return {
            "version": STATE_VERSION,
            "window_s": self.window_s,
            "allowed_lateness_s": self.allowed_lateness_s,
            "lanes": {str(p): lane.state() for p, lane in sorted(self._lanes.items())},
            "ready": [
                {"impression": j.impression.model_dump(mode="json"),
                 "feedback": [f.model_dump(mode="json") for f in j.feedback]}
                for j in self._ready
            ],
            "seq": self._seq,
            "counters": dict(self.counters),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Joiner:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported joiner state version {state.get('version')!r}")
        j = cls(state["window_s"], state["allowed_lateness_s"])
        for p, lane_state in state["lanes"].items():
            j._lane(int(p)).load(lane_state)
        for item in state["ready"]:
            impression = Impression.model_validate(item["impression"])
            feedback = [Feedback.model_validate(f) for f in item["feedback"]]
            j._ready.append(JoinedImpression(impression, feedback))
        j._seq = state["seq"]
        j.counters.update(state["counters"])
        return j
