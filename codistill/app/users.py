"""Seeded users against a ranker: the drivers behind ``codistill simulate`` and the stack arm.

:func:`simulate_in_process` ranks each visit in-process and writes its v2 impression and
click feedback (with the click model's propensity) to the events topic keyed by request
id, as the server writes them, with wall-clock event times so a live trainer joins them;
candidates the store has no teacher embedding for are declared ``unknown_candidate_ids``
(texts stored first, :func:`unknown_to_store`). :func:`simulate_on_server` sends
``/v1/rank`` and a ``/v1/feedback`` per click to the HTTP server, which writes both
events. Both only need a :class:`~streaming.simulator.Ranker`, so this module knows
nothing of the experiment that builds the rankers (``codistill experiment online``
imports it, not the other way round).
"""

from __future__ import annotations

import http.client
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from rich.progress import Progress

from codistill import console as cli
from codistill.app.traffic import JsonClient
from codistill.config import Settings
from codistill.ranking import RankingExample
from streaming.base import StreamError
from streaming.events import Event
from streaming.simulator import Interaction, Ranker, SimulatorConfig, UserStream, Visit
from streaming.simulator import simulate_one as show

log = logging.getLogger("codistill.app.users")
FLUSH_EVERY = 256  # impressions sent between two flushes (counted written after one)


class CallFailed(RuntimeError):
    """No usable answer from the server: none, a 4xx/5xx, or a malformed body."""


@dataclass
class SimulationSummary:
    """What a run did. ``impressions``, ``clicks`` (by 1-based position) and their mean
    ``propensity``: the users', on the lists they were shown. ``events_written``: reached
    the log (in-process: confirmed by a flush; ``server``: answered 200, the server writes
    them). ``errors``: failed sends, flushes or calls. ``first_seen_share``: visits that
    were their query's first."""

    ranker: str
    target: str
    seed: int
    model_version: str | None = None
    request_prefix: str | None = None
    impressions: int = 0
    clicks: int = 0
    clicks_per_position: dict[str, int] = field(default_factory=dict)
    mean_propensity: float | None = None
    events_written: int = 0
    errors: int = 0
    seconds: float = 0.0
    events_per_s: float = 0.0
    first_seen_share: float | None = None
    _propensities: list[float] = field(default_factory=list)
    _first_seen: int = 0
    _reasons: set[str] = field(default_factory=set)

    def record(self, inter: Interaction, version: str) -> None:
        self.model_version, self.impressions = version, self.impressions + 1
        self._first_seen += inter.visit.first_seen
        for fb in inter.feedback:
            key = str(fb.position)
            self.clicks_per_position[key] = self.clicks_per_position.get(key, 0) + 1
            self._propensities.append(fb.propensity or 0.0)
        self.clicks = len(self._propensities)

    def fail(self, reason: str) -> None:
        """One more error; each distinct reason is logged once (the run goes on)."""
        self.errors += 1
        if reason not in self._reasons and len(self._reasons) < 64:
            self._reasons.add(reason)
            log.warning("simulate error (each reason logged once): %s", reason)

    def finish(self, seconds: float) -> None:
        self.seconds = round(seconds, 3)
        self.events_per_s = round(self.events_written / seconds, 1) if seconds > 0 else 0.0
        self.clicks_per_position = dict(sorted(self.clicks_per_position.items(),
                                               key=lambda kv: int(kv[0])))
        p, n = self._propensities, self.impressions
        self.mean_propensity, self.first_seen_share = (sum(p) / len(p) if p else None,
                                                       self._first_seen / n if n else None)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if not k.startswith("_")})


class HttpRanker:
    """The server as the simulator's :class:`~streaming.simulator.Ranker`: ``/v1/rank`` with
    the example's candidates, ids and texts (over ``max_candidates``: the gold and the
    first others, as ``codistill traffic`` sends), the answer mapped back to indices; its
    ``request_id`` and ``model_version`` are kept for that impression's feedback."""

    def __init__(self, url: str, client: JsonClient | None = None, *, max_candidates: int = 200,
                 depth: int = 10) -> None:
        self.url, self.client = url.rstrip("/"), client or JsonClient()
        self.max_candidates, self.depth = max_candidates, depth
        self.request_id: str | None = None
        self.version = "server"  # the serving bundle's, once it answered

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The JSON answer of a 2xx; :class:`CallFailed` (naming the call) otherwise."""
        try:
            status, answer = self.client.call("POST", self.url + path, body)
        except (OSError, http.client.HTTPException) as exc:
            raise CallFailed(f"POST {path}: {exc}") from None
        if not (200 <= status < 300 and isinstance(answer, dict)):
            detail = answer.get("detail") if isinstance(answer, dict) else answer
            raise CallFailed(f"POST {path}: HTTP {status}: {detail}")
        return answer

    def rank(self, example: RankingExample) -> Sequence[int]:
        self.request_id = None
        g, n = example.gold_index, len(example.candidate_ids)
        keep = sorted([g, *(i for i in range(n) if i != g)][: self.max_candidates])
        answer = self.post("/v1/rank", {
            "query": example.query, "top_k": min(self.depth, len(keep)),
            "candidates": [{"id": example.candidate_ids[i], "text": example.candidates[i]}
                           for i in keep]})
        index = {c: i for i, c in enumerate(example.candidate_ids)}
        try:
            order = [index[r["id"]] for r in answer["results"]]
            request_id, version = str(answer["request_id"]), str(answer["model_version"])
        except (KeyError, TypeError) as exc:
            raise CallFailed(f"POST /v1/rank: malformed answer ({exc!r})") from None
        self.request_id, self.version = request_id, version
        return order


def unknown_to_store(settings: Settings, examples: Sequence[RankingExample],
                     version: str | None) -> frozenset[str]:
    """Candidates without a ``version`` teacher embedding in the store; their texts are
    stored before any impression names them, as the server stores its fallbacks'."""
    from stores import open_configured_store

    texts = {c: t for ex in examples for c, t in zip(ex.candidate_ids, ex.candidates, strict=True)}
    with open_configured_store(settings) as store:
        version = version or store.current()
        known = store.has_embeddings(version, list(texts)) if version else [False] * len(texts)
        unknown = [c for c, ok in zip(texts, known, strict=True) if not ok]
        store.put_texts({c: texts[c] for c in unknown})
    return frozenset(unknown)


def declared(inter: Interaction, unknown: frozenset[str]) -> list[Event]:
    """The interaction's events with its store-unknown candidates declared (schema v2)."""
    imp = inter.impression
    if shown := [c for c in imp.candidate_ids if c in unknown]:
        imp = imp.model_copy(update={"unknown_candidate_ids": shown})
    return [imp, *(f.model_copy(update={"unknown_candidate": True})
                   if f.candidate_id in unknown else f for f in inter.feedback)]


def run_visits(examples: Sequence[RankingExample], cfg: SimulatorConfig, n: int,
               visit: Callable[[int, Visit], None], *, rate: float = 0.0,
               progress: bool = False, label: str = "simulate") -> None:
    """``visit`` on visits ``0..n-1`` of a fresh user stream, visit ``i`` due at ``start +
    i / rate`` (``rate`` 0: at once); Ctrl-C stops after the current one."""
    users, t0 = UserStream(examples, cfg), time.monotonic()
    with Progress(console=cli.console, transient=True, disable=not progress) as bar:
        task = bar.add_task(label, total=n)
        try:
            for i in range(n):
                if rate > 0 and (delay := t0 + i / rate - time.monotonic()) > 0:
                    time.sleep(delay)
                visit(i, users.draw(i))
                bar.advance(task)
        except KeyboardInterrupt:
            log.warning("interrupted: stopping with the visits done")


def simulate_in_process(settings: Settings, ranker: Ranker, examples: list[RankingExample],
                        unknown: frozenset[str], cfg: SimulatorConfig, n: int,
                        summary: SimulationSummary, progress: bool = False) -> None:
    """Rank in-process and write the events to ``settings``' events topic."""
    from streaming import open_stream

    topic, prefix = settings.stream.topic, summary.request_prefix
    stream = open_stream(settings.resolved_stream())
    summary.target = f"{stream.describe()}/{topic}"
    pending: list[int] = []  # events per impression sent since the last flush

    def flush() -> None:
        try:
            stream.flush()
            summary.events_written += sum(pending)
        except StreamError as exc:
            summary.fail(f"flush: {exc}")
        pending.clear()

    def visit(i: int, v: Visit) -> None:
        inter = show(replace(v, event_time=datetime.now(UTC)), ranker, cfg,
                     request_id=f"{prefix}-{i:07d}")
        summary.record(inter, ranker.version)
        try:
            for event in declared(inter, unknown):
                stream.send(topic, event.request_id, event.to_bytes())
        except StreamError as exc:
            return summary.fail(f"send: {exc}")
        pending.append(len(inter.events))
        if len(pending) >= FLUSH_EVERY:
            flush()

    try:
        stream.ensure_topics()
        t0 = time.monotonic()
        run_visits(examples, cfg, n, visit, progress=progress, label=f"simulate ({summary.ranker})")
        flush()
        summary.finish(time.monotonic() - t0)
    finally:
        stream.close()


def simulate_on_server(ranker: HttpRanker, examples: list[RankingExample], cfg: SimulatorConfig,
                       n: int, summary: SimulationSummary, rate: float = 0.0,
                       progress: bool = False,
                       on_shown: Callable[[int, Interaction], None] | None = None) -> None:
    """Rank on the server and send each click with its propensity; the server writes both
    events, the impression under its own request id (the simulator's is not used).
    ``on_shown(i, interaction)`` sees each visit the server answered, before its clicks
    are sent (``codistill experiment online --stack`` scores it there)."""
    def visit(i: int, v: Visit) -> None:
        try:
            inter = show(v, ranker, cfg, request_id=f"unused-{i}")
        except (CallFailed, ValueError) as exc:
            return summary.fail(str(exc))
        summary.record(inter, ranker.version)
        if on_shown is not None:
            on_shown(i, inter)
        summary.events_written += 1  # the server's impression
        for fb in inter.feedback:
            try:
                answer = ranker.post("/v1/feedback", {
                    "request_id": ranker.request_id, "candidate_id": fb.candidate_id,
                    "action": fb.action, "propensity": fb.propensity})
            except CallFailed as exc:
                summary.fail(str(exc))
                continue
            if answer.get("position") == fb.position:
                summary.events_written += 1
            else:
                summary.fail(f"the server put a click at position {answer.get('position')}, "
                             f"the user clicked {fb.position}")

    t0 = time.monotonic()
    run_visits(examples, cfg, n, visit, rate=rate, progress=progress, label="simulate (server)")
    summary.finish(time.monotonic() - t0)
