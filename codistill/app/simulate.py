"""``codistill simulate``: seeded users on a ranker, emitting real impression and feedback events.

The users are :mod:`streaming.simulator`'s (queries of the online split, a code style the
teacher does not know, a click model; options override ``experiment.*``). The ranker runs
in-process (``teacher``, ``student``: the home's current ones, as ``codistill experiment
online`` ranks; ``bm25``) or is the HTTP server (``server``).

In-process, each visit's v2 impression and click feedback (with the click model's
propensity) go to the events topic keyed by request id, as the server writes them, with
wall-clock event times so a live trainer joins them. Candidates the store has no teacher
embedding for are declared ``unknown_candidate_ids`` (texts stored first), as the server
declares its fallbacks, so the trainer's store check lets them through and the labeller
can embed them. With ``server`` the server writes both events: this sends ``/v1/rank``
and a ``/v1/feedback`` per click with its propensity. The summary JSON is printed last.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.progress import Progress

from codistill import console as cli
from codistill.app.traffic import JsonClient, TrafficGenerator, default_url
from codistill.config import Settings
from codistill.ranking import RankingExample
from streaming.base import StreamError
from streaming.events import Event
from streaming.simulator import Interaction, Ranker, SimulatorConfig, UserStream, Visit
from streaming.simulator import simulate_one as show

log = logging.getLogger("codistill.app.simulate")
Opt = typer.Option
RANKERS = ("teacher", "student", "bm25", "server")
FLUSH_EVERY = 256  # impressions sent between two flushes (counted written after one)
PREPARE = "prepare it with `codistill stack prepare` (or `codistill experiment online`)"


class CallFailed(RuntimeError):
    """No usable answer from the server: none, a 4xx/5xx, or a malformed body."""


def simulator_config(settings: Settings, seed: int, **overrides: Any) -> SimulatorConfig:
    """``experiment.*``'s users with ``seed``; ``overrides`` that are not None win."""
    fields = settings.experiment.model_dump(include={
        "click_model", "strength", "preference", "switch_to", "switch_after", "depth",
        "propensity"})
    return SimulatorConfig(seed=seed, **{**fields, **{k: v for k, v in overrides.items()
                                                      if v is not None}})


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


def in_process_ranker(settings: Settings, name: str, log_fn: Callable[..., Any] = print
                      ) -> tuple[Ranker, list[RankingExample], str | None]:
    """The arm ``name``, the online split and its store check's teacher version (None: current)."""
    from codistill.app.experiment.arms import BM25Arm, StudentArm, TeacherArm
    from codistill.app.experiment.commands import build_context
    from student.registry import student_registry
    from tasks.dataset import ONLINE_FILE, read_online

    if not (path := settings.data_dir / ONLINE_FILE).exists():
        raise FileNotFoundError(f"{path} not found: the home {settings.home} has no online "
                                f"split; {PREPARE}")
    if name == "bm25":
        return BM25Arm(examples := read_online(settings)), examples, None
    if student_registry(settings.home).current_version() is None:
        raise ValueError(f"no current student in {settings.home}: {PREPARE}")

    ctx, info = build_context(settings, cli.progress(), log_fn, prepare=False)
    arm = (TeacherArm(ctx.view, ctx.view.version) if name == "teacher"
           else StudentArm(ctx.distilled, info["student_version"]))
    return arm, ctx.examples, ctx.view.version


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
                       progress: bool = False) -> None:
    """Rank on the server and send each click with its propensity; the server writes both
    events, the impression under its own request id (the simulator's is not used)."""
    def visit(i: int, v: Visit) -> None:
        try:
            inter = show(v, ranker, cfg, request_id=f"unused-{i}")
        except (CallFailed, ValueError) as exc:
            return summary.fail(str(exc))
        summary.record(inter, ranker.version)
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


def simulate_command(
    ranker: Annotated[str, Opt(help="teacher | student | bm25 (in-process: events to the "
                               "stream) | server (the server writes them)")] = "teacher",
    server_url: Annotated[str | None, Opt(help="--ranker server; default traffic.server_url, "
                                          "else serving's")] = None,
    impressions: Annotated[int | None, Opt(min=1, help="default experiment.impressions")] = None,
    seed: Annotated[int, Opt(min=0, help="the users' seed")] = 0,
    click_model: Annotated[str | None, Opt(help="pbm | perfect | navigational | informational")
                           ] = None,
    strength: Annotated[float | None, Opt(help="P(preferred negative relevant), [0, 0.5]")] = None,
    switch_after: Annotated[int | None, Opt(min=0, help="impressions before the preference "
                                            "drifts; 0 = never")] = None,
    propensity: Annotated[str | None, Opt(help="model | swap (estimated)")] = None,
    rate: Annotated[float | None, Opt(min=0, help="--ranker server: rank requests/s; 0 = as "
                                      "fast as possible")] = None,
) -> None:
    """Seeded users search the online split on a ranker and click (options override
    ``experiment.*``); their impressions and feedback, with the click model's
    propensities, land on the events topic. The summary JSON is printed last, on one line."""
    if ranker not in RANKERS:
        raise cli.fail(ValueError(f"unknown ranker {ranker!r}; known: {', '.join(RANKERS)}"))
    if ranker != "server" and (server_url is not None or rate is not None):
        raise cli.fail(ValueError("--server-url and --rate apply to --ranker server only"))
    s = cli.settings()
    try:
        cfg = simulator_config(s, seed, click_model=click_model, strength=strength,
                               propensity=propensity, switch_after=switch_after)
        cfg = replace(cfg, switch_after=None) if switch_after == 0 else cfg
    except ValueError as exc:
        raise cli.fail(exc) from None
    n = impressions or s.experiment.impressions
    echo = lambda m: cli.console.print(m, markup=False, soft_wrap=True)  # noqa: E731
    from stores.base import StoreError
    from tasks.dataset import read_online

    try:
        if ranker == "server":
            url = (server_url or default_url(s)).rstrip("/")
            remote = HttpRanker(url, max_candidates=s.serving.max_candidates, depth=cfg.depth)
            examples, summary = read_online(s), SimulationSummary(ranker, url, seed)
            echo(f"simulating {n} visits (seed {seed}, {cfg.click_model}) on {url}")
            TrafficGenerator(s, url, remote.client, sources=[], echo=echo).wait_ready(
                threading.Event())  # up to 60 s, then it sends anyway (failures are counted)
            simulate_on_server(remote, examples, cfg, n, summary, rate or 0.0, cli.progress())
        else:
            arm, examples, version = in_process_ranker(s, ranker, echo)
            unknown = unknown_to_store(s, examples, version)
            prefix = f"sim-{ranker}-{seed}-{uuid.uuid4().hex[:8]}"  # runs never share an id
            summary = SimulationSummary(ranker, s.stream.topic, seed, request_prefix=prefix)
            echo(f"simulating {n} visits (seed {seed}, {cfg.click_model}) on {arm.version} "
                 f"-> events topic {s.stream.topic}")
            simulate_in_process(s, arm, examples, unknown, cfg, n, summary, cli.progress())
    except (FileNotFoundError, ValueError, KeyError, StoreError, StreamError) as exc:
        raise cli.fail(exc) from None
    cli.out.print(summary.to_json(), markup=False, highlight=False, soft_wrap=True)
