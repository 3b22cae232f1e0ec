"""``codistill traffic``: real queries on a running server, with simulated clicks.

The stack's online-quality and drift panels need users: this ranks lists of the built
data (``traffic.sources`` in turn), candidates with text *and* id, and sends the feedback
of a seeded position-biased user (:func:`simulate_user`). No failure stops it: no answer
or a 5xx is an error and the list goes again next tick (the server may start later); a
4xx is rejected; each distinct reason is logged once.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import random
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.progress import Progress

from codistill import console as cli
from codistill.config import Settings, TrafficSettings
from codistill.ranking import RankingExample
from tasks.dataset import SPLITS, built_guards, read_guard, read_split

log = logging.getLogger("codistill.app.traffic")

Source = tuple[str, list[RankingExample]]
GUARD, TOP_K = "guard:", 10
NOISE_CLICK = 0.02  # P(click | examined, not gold)
MAX_BACKLOG_S, MAX_REASONS = 1.0, 64  # catch-up after a stall (no burst); reasons logged


def default_url(settings: Settings) -> str:
    """``traffic.server_url``, else the server's own address (a wildcard bind as loopback)."""
    if settings.traffic.server_url:
        return settings.traffic.server_url.rstrip("/")
    return settings.serving.local_url


def load_sources(settings: Settings, names: Sequence[str] | None = None) -> list[Source]:
    """The lists of each source in ``names`` (default ``traffic.sources``), in order.

    Raises ValueError for a name that is no split nor built guard set (the message names
    those) or an empty source; FileNotFoundError (naming the build) before a data build."""
    out: list[Source] = []
    for name in names if names is not None else settings.traffic.sources:
        if name.startswith(GUARD):
            guard, built = name.removeprefix(GUARD), built_guards(settings)
            if guard not in built:
                have = ", ".join(GUARD + g for g in built) or "none"
                raise ValueError(f"traffic.sources: no built guard set {guard!r} in "
                                 f"{settings.data_dir}; available guard sets: {have}")
            examples = read_guard(settings, guard)
        elif name in SPLITS:
            examples = read_split(settings, name)  # type: ignore[arg-type]
        else:
            raise ValueError(f"traffic.sources: {name!r} is neither a split "
                             f"({', '.join(SPLITS)}) nor guard:<name>")
        if not examples:
            raise ValueError(f"traffic.sources: {name!r} has no lists")
        out.append((name, examples))
    return out


def simulate_user(rng: random.Random, shown: Sequence[str], gold: str, eta: float,
                  accept_share: float, noise_click: float = NOISE_CLICK) -> list[tuple[str, str]]:
    """One user's feedback on a served list, as ``(candidate_id, action)`` in order.

    Rank ``r`` is examined with ``1 / r ** eta`` (the position bias an online learner must
    correct for, so the clicks must carry it); an examined gold is clicked, and accepted
    with ``accept_share``; another examined result is clicked with ``noise_click``, as
    real logs are not all gold."""
    actions: list[tuple[str, str]] = []
    for r, cid in enumerate(shown, start=1):
        if rng.random() >= r ** -eta:
            continue  # not examined
        if cid == gold or rng.random() < noise_click:
            actions.append((cid, "click"))
        if cid == gold and rng.random() < accept_share:
            actions.append((cid, "accept"))
    return actions


@dataclass
class JsonClient:
    """JSON over stdlib urllib, as :class:`serving.watcher.AdminClient` (no new dependency):
    ``(status, body)`` for any answer, 4xx and 5xx included; OSError when none comes."""

    timeout_s: float = 10.0

    def call(self, method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(url, None if body is None else json.dumps(body).encode(),
                                     {"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:  # before URLError (an OSError): it is one
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, {"detail": raw[:200].decode(errors="replace")}


@dataclass
class TrafficSummary:
    """What a run did. ``sent``/``ok``: rank requests; ``errors``/``rejected``: any call;
    ``clicks`` (``noise_clicks`` of them off the gold) and ``accepts``: acknowledged
    feedback; ``per_source``: ``sent`` and ``ok`` by source."""

    url: str
    sent: int = 0
    ok: int = 0
    errors: int = 0
    rejected: int = 0
    clicks: int = 0
    noise_clicks: int = 0
    accepts: int = 0
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    ended: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class TrafficGenerator:
    """Paced rank requests and simulated feedback to ``base_url``; ``config`` defaults to
    ``settings.traffic``. A list over ``serving.max_candidates`` keeps the gold and the first."""

    def __init__(self, settings: Settings, base_url: str, client: JsonClient | None = None,
                 *, config: TrafficSettings | None = None, sources: list[Source] | None = None,
                 ready_timeout_s: float = 60.0, noise_click: float = NOISE_CLICK,
                 echo: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg = config or settings.traffic
        self.url, self.client = base_url.rstrip("/"), client or JsonClient()
        self.sources = sources if sources is not None else load_sources(settings, cfg.sources)
        self.max_candidates = settings.serving.max_candidates
        self.ready_timeout_s, self.noise_click = ready_timeout_s, noise_click
        self.echo = echo or (lambda message: log.warning("%s", message))
        self._reasons: set[str] = set()

    def _readyz(self) -> str | None:
        try:
            status, body = self.client.call("GET", self.url + "/readyz")
        except (OSError, http.client.HTTPException) as exc:
            return str(exc)
        return None if status == 200 else f"HTTP {status}: {body}"

    def wait_ready(self, stop: threading.Event) -> bool:
        """Poll ``/readyz`` until 200, ``ready_timeout_s`` or ``stop``; say why it waits."""
        deadline, why = time.monotonic() + self.ready_timeout_s, self._readyz()
        if why is not None:
            self.echo(f"waiting up to {self.ready_timeout_s:g} s for {self.url}/readyz ({why})")
        while why is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.echo(f"{self.url} is not ready after {self.ready_timeout_s:g} s ({why}); "
                          "sending anyway: failures are counted and retried")
                return False
            if stop.wait(min(0.25, left)):
                return False
            why = self._readyz()
        return True

    def _post(self, path: str, body: dict[str, Any], summary: TrafficSummary) -> tuple[str, Any]:
        """``("ok", answer)``, ``("error", None)`` or ``("rejected", None)``, counted."""
        try:
            status, answer = self.client.call("POST", self.url + path, body)
        except (OSError, http.client.HTTPException) as exc:  # no answer, or a garbled one
            status, answer = 0, {"detail": str(exc)}
        if 200 <= status < 400 and isinstance(answer, dict):
            return "ok", answer
        kind = "rejected" if 400 <= status < 500 else "error"
        summary.rejected += kind == "rejected"
        summary.errors += kind == "error"
        detail = answer.get("detail") if isinstance(answer, dict) else answer
        reason = f"POST {path}: " + (f"HTTP {status}: {detail}" if status else str(detail))
        key = re.sub(r"'[^']*'|\d+", "#", reason)  # ids and numbers vary, the reason not
        if key not in self._reasons and len(self._reasons) < MAX_REASONS:
            self._reasons.add(key)
            log.warning("traffic %s (each reason logged once): %s", kind, reason)
        return kind, None

    def _payload(self, ex: RankingExample) -> dict[str, Any]:
        g = ex.gold_index  # the gold and the first others, in list order
        keep = sorted([g, *(i for i in range(len(ex.candidates)) if i != g)][: self.max_candidates])
        return {"query": ex.query, "top_k": min(TOP_K, len(keep)),
                "candidates": [{"id": ex.candidate_ids[i], "text": ex.candidates[i]}
                               for i in keep]}

    def _tick(self, name: str, ex: RankingExample, users: random.Random,
              summary: TrafficSummary) -> bool:
        """One rank request and its user; False when the list should be sent again."""
        counts = summary.per_source[name]
        summary.sent += 1
        counts["sent"] += 1
        outcome, answer = self._post("/v1/rank", self._payload(ex), summary)
        if outcome != "ok":
            return outcome == "rejected"  # the same list would be rejected again
        request_id = str(answer.get("request_id"))  # a malformed answer: feedback rejected
        shown = [str(r.get("id")) for r in answer.get("results", []) if isinstance(r, dict)]
        summary.ok += 1
        counts["ok"] += 1
        gold = ex.candidate_ids[ex.gold_index]
        for cid, action in simulate_user(users, shown, gold, self.cfg.click_eta,
                                         self.cfg.accept_share, self.noise_click):
            body = {"request_id": request_id, "candidate_id": cid, "action": action}
            if self._post("/v1/feedback", body, summary)[0] != "ok":
                continue
            if action == "accept":
                summary.accepts += 1
            else:
                summary.clicks += 1
                summary.noise_clicks += cid != gold
        return True

    def run(self, stop: threading.Event | None = None, progress: bool = False) -> TrafficSummary:
        """Send until ``requests`` ticks (attempts, failures included) or ``stop``.

        Tick ``i`` is due at ``start + i / rate``: sleeping to that schedule, not for a fixed
        gap, keeps the rate exact whatever each request costs."""
        stop, cfg = stop or threading.Event(), self.cfg
        summary = TrafficSummary(url=self.url, per_source={
            name: {"sent": 0, "ok": 0} for name, _ in self.sources})
        users = random.Random(cfg.seed)
        cycles = [itertools.cycle(random.Random(f"{cfg.seed}:{name}").sample(ex, len(ex)))
                  for name, ex in self.sources]  # each source in its own seeded order
        with Progress(console=cli.console, transient=True, disable=not progress) as bar:
            task = bar.add_task("traffic", total=cfg.requests)
            self.wait_ready(stop)
            current, retry, tick, start = 0, None, 0, time.monotonic()
            while not stop.is_set() and (cfg.requests is None or summary.sent < cfg.requests):
                if (current < len(self.sources) - 1 and summary.per_source[
                        self.sources[current][0]]["sent"] >= cfg.switch_after):
                    current, retry = current + 1, None
                name = self.sources[current][0]
                delay = start + tick / cfg.rate - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
                if delay < -MAX_BACKLOG_S:
                    start -= delay + MAX_BACKLOG_S
                ex = retry or next(cycles[current])
                retry = None if self._tick(name, ex, users, summary) else ex
                tick += 1
                bar.update(task, advance=1, description=f"traffic ({name})")
        summary.ended = datetime.now(UTC).isoformat(timespec="seconds")
        return summary


def traffic_command(
    server_url: Annotated[str | None, typer.Option(help="default: serving.host:port")] = None,
    rate: Annotated[float | None, typer.Option(help="rank requests per second")] = None,
    requests: Annotated[int | None, typer.Option(help="stop after this many")] = None,
    switch_after: Annotated[int | None, typer.Option(help="requests per source")] = None,
    sources: Annotated[str | None, typer.Option(help="splits, guard:<name>, ...")] = None,
    ready_timeout: Annotated[float, typer.Option(min=0, help="s to wait for /readyz")] = 60.0,
) -> None:
    """Rank real queries on a server with simulated clicks, for the stack's dashboards
    (options override ``traffic.*``). SIGTERM or Ctrl-C ends it after the current request,
    with exit 0; the summary JSON is printed last, on one line."""
    names = [n.strip() for n in sources.split(",") if n.strip()] if sources else None
    overrides = {k: v for k, v in {"server_url": server_url, "rate": rate, "requests": requests,
                                   "switch_after": switch_after, "sources": names}.items()
                 if v is not None}
    s = cli.settings(traffic=overrides) if overrides else cli.settings()
    try:
        gen = TrafficGenerator(s, default_url(s), ready_timeout_s=ready_timeout,
                               echo=lambda m: cli.console.print(m, markup=False, soft_wrap=True))
    except (ValueError, FileNotFoundError) as exc:
        raise cli.fail(exc) from None
    stop, previous = threading.Event(), {}
    if threading.current_thread() is threading.main_thread():  # signals need the main thread
        previous = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGTERM, signal.SIGINT)}
    cfg = s.traffic
    cli.console.print(f"traffic to {gen.url} from {', '.join(cfg.sources)} at {cfg.rate:g} "
                      f"requests/s, {cfg.requests or 'unlimited'} requests", markup=False)
    try:
        summary = gen.run(stop, progress=cli.progress())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    cli.out.print(summary.to_json(), markup=False, highlight=False, soft_wrap=True)
