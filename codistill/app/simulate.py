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

import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any

import typer

from codistill import console as cli
from codistill.app.traffic import TrafficGenerator, default_url
from codistill.app.users import (
    HttpRanker,
    SimulationSummary,
    simulate_in_process,
    simulate_on_server,
    unknown_to_store,
)
from codistill.config import Settings
from codistill.ranking import RankingExample
from streaming.base import StreamError
from streaming.simulator import Ranker, SimulatorConfig

Opt = typer.Option
RANKERS = ("teacher", "student", "bm25", "server")
PREPARE = "prepare it with `codistill stack prepare` (or `codistill experiment online`)"


def simulator_config(settings: Settings, seed: int, **overrides: Any) -> SimulatorConfig:
    """``experiment.*``'s users with ``seed``; ``overrides`` that are not None win."""
    fields = settings.experiment.model_dump(include={
        "click_model", "strength", "preference", "switch_to", "switch_after", "depth",
        "propensity"})
    return SimulatorConfig(seed=seed, **{**fields, **{k: v for k, v in overrides.items()
                                                      if v is not None}})


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
