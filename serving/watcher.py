"""``codistill serve-watch``: promote a new bundle only when the gate finds it no worse.

A trainer exports bundles continually; none should serve just because it is newer.
The watcher polls the bundle registry, scores each new bundle and the one the server
reports as serving on valid and every built guard set exactly as the server would
(:func:`serving.vectors.example_scores`), and promotes through ``POST
/v1/admin/promote`` (the server's own warm / probe / swap and audit) only if
:func:`codistill.gate.decide` passes it in ``non-inferiority`` mode. It is a separate
process because judging costs CPU the server owes its requests, and a crash while
judging must never take serving down. A rejection leaves the server untouched and
bumps ``codistill_watcher_gate_rejections_total{reason}``, the reason from a fixed
vocabulary (:data:`REASONS` or ``guard:<name>``) so labels stay bounded. Decisions are
appended to ``HOME/serving/gate-decisions.jsonl``; judged versions are kept in
``HOME/serving/watcher.json`` so a restart does not judge them again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import numpy as np
import typer
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from codistill import console as cli
from codistill.config import ServingSettings, Settings
from codistill.fsio import atomic_write_json
from codistill.gate import VALID, GateConfig, GateDecision, decide
from codistill.metrics import per_query
from codistill.ranking import RankingExample
from serving.bundle import BundleError, BundleRegistry
from serving.runtime import OnnxRanker
from serving.vectors import VectorCache, example_scores
from stores.base import CandidateStore, StoreError

log = logging.getLogger("codistill.serving.watcher")

DEFAULT_GATE = ServingSettings().gate  # non-inferiority: the one default, in config
#: rejection reasons besides ``guard:<name>`` (load_failed: hash/graph; promote_refused: probe)
REASONS = ("valid", "load_failed", "promote_refused")


class IncumbentUnavailable(BundleError):
    """The serving bundle could not be loaded for judging: not the candidate's fault."""


class ServerDown(RuntimeError):
    """No answer, a timeout or a 5xx: try again at the next poll."""


class ServerRefused(RuntimeError):
    """A 4xx: the server understood and said no (wrong key, unknown or unloadable bundle)."""


#: what ends a poll early (retried next poll), by ``poll_errors_total{kind}``
_OUTAGES: dict[type[Exception], str] = {ServerDown: "server", ServerRefused: "server",
                                        StoreError: "store", IncumbentUnavailable: "incumbent",
                                        FileNotFoundError: "data"}


def gate_sets(settings: Settings) -> dict[str, list[RankingExample]]:
    """``valid`` and every built guard set by its bare name, as the teacher's gate names them."""
    from tasks.dataset import built_guards, read_guard, read_split

    sets = {VALID: read_split(settings, "valid")}
    sets.update({name: read_guard(settings, name) for name in built_guards(settings)})
    return {name: examples for name, examples in sets.items() if examples or name == VALID}


def _per_query_mrr(ranker: OnnxRanker, vectors: VectorCache | None,
                   examples: list[RankingExample]) -> np.ndarray:
    scores = [example_scores(ranker, vectors, ex)[0] for ex in examples]
    return per_query(scores, [ex.labels for ex in examples], ("mrr@10",))["mrr@10"]


def judge_bundle(settings: Settings, store: CandidateStore | None, candidate_version: str,
                 incumbent_version: str, gate: GateConfig | None = None) -> GateDecision:
    """Gate ``candidate_version`` against ``incumbent_version``, both scored as served.

    Per-query MRR@10 on the same lists for both; each bundle without a candidate tower
    reads its own teacher's vectors from ``store`` (bundles of different teachers are
    judged anyway, and the decision's reason says so). ``gate`` defaults to
    :data:`DEFAULT_GATE`: a retrained student must be no worse, not better, to serve.

    Raises
    ------
    BundleError
        The candidate cannot be loaded; :class:`IncumbentUnavailable` for the incumbent.
    StoreError
        A store read failed while scoring: fallback scores would judge the outage.
    """
    registry = BundleRegistry(settings.bundles_dir)
    cfg = settings.serving
    new = OnnxRanker.load(registry, candidate_version, cfg.threads, cfg.graph_optimization)
    try:
        old = OnnxRanker.load(registry, incumbent_version, cfg.threads, cfg.graph_optimization)
    except BundleError as exc:
        raise IncumbentUnavailable(f"serving bundle {incumbent_version}: {exc}") from exc
    caches = {r.card.teacher_version: VectorCache(store, r.card.teacher_version, 10**7)
              for r in (new, old)}  # a bundle with a candidate tower ignores its cache
    per_set = {name: (_per_query_mrr(new, caches[new.card.teacher_version], examples),
                      _per_query_mrr(old, caches[old.card.teacher_version], examples))
               for name, examples in gate_sets(settings).items()}
    failed = sum(c.store_errors for c in caches.values())
    if failed:
        raise StoreError(f"{failed} store reads failed while judging {candidate_version}")
    decision = decide(per_set, gate or DEFAULT_GATE)
    t_new, t_old = new.card.teacher_version, old.card.teacher_version
    if t_new != t_old:
        decision = dataclasses.replace(decision, reason=(
            f"{decision.reason}; teacher versions differ (candidate {t_new}, serving "
            f"{t_old}): each bundle was scored against its own teacher's vectors"))
    return decision


def rejection_reason(decision: GateDecision) -> str:
    """The first failed set as a bounded label: ``valid`` or ``guard:<name>``."""
    name = next(s.name for s in decision.sets if not s.passed)
    return VALID if name == VALID else f"guard:{name}"


class AdminClient:
    """``/v1/admin`` over stdlib HTTP: which bundle serves, and promote one."""

    def __init__(self, url: str, api_key: str, timeout_s: float = 60.0) -> None:
        self.url, self.api_key, self.timeout_s = url.rstrip("/"), api_key, timeout_s

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"X-API-Key": self.api_key, "Content-Type": "application/json"}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:  # before URLError: it is one
            detail = exc.read()[:300].decode(errors="replace")
            kind = ServerDown if exc.code >= 500 else ServerRefused
            raise kind(f"{method} {self.url}{path}: HTTP {exc.code} {detail}") from None
        except (OSError, ValueError) as exc:  # URLError, refused, timeout, not JSON
            raise ServerDown(f"{method} {self.url}{path}: {exc}") from None

    def serving(self) -> str | None:
        """The version in the server's ``serving`` slot (None if it reports none)."""
        return next((b["version"] for b in self._call("GET", "/v1/admin/bundles")
                     if b.get("slot") == "serving"), None)

    def promote(self, version: str) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/admin/promote", {"version": version}))


class WatcherMetrics:
    """The watcher's Prometheus series (``codistill_watcher_``), in its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "codistill_watcher_"
        self.judged = Counter(p + "judged_total", "Bundles judged by the gate", registry=r)
        self.promotions = Counter(p + "promotions_total", "Bundles promoted", registry=r)
        self.rejections = Counter(p + "gate_rejections_total", "Bundles not promoted",
                                  ["reason"], registry=r)
        self.errors = Counter(p + "poll_errors_total", "Polls cut short by an outage",
                              ["kind"], registry=r)
        self.last_decision = Gauge(p + "last_decision_timestamp_seconds",
                                   "Unix time of the last gate decision", registry=r)


@dataclass
class PollResult:
    """What one :meth:`Watcher.run_once` did."""

    serving: str | None = None
    promoted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # version -> reason
    judged: list[str] = field(default_factory=list)
    error: str | None = None


class Watcher:
    """Polls ``settings.bundles_dir`` and promotes what the gate lets through.

    ``server_url`` / ``api_key``: the server and its ``serving.admin_api_key``.
    ``trainer_only``: consider only bundles whose card ``source`` names a ``trainer``
    (default: any bundle newer than the serving one). ``http_timeout_s`` is per request
    and generous: a promote loads, warms and probes the bundle before it answers.
    """

    def __init__(self, settings: Settings, store: CandidateStore | None, server_url: str,
                 api_key: str, *, gate: GateConfig | None = None, interval_s: float = 30.0,
                 trainer_only: bool = False, http_timeout_s: float = 60.0) -> None:
        self.settings, self.store, self.gate = settings, store, gate or DEFAULT_GATE
        self.interval_s, self.trainer_only = interval_s, trainer_only
        self.registry = BundleRegistry(settings.bundles_dir)
        self.client = AdminClient(server_url, api_key, http_timeout_s)
        self.metrics = WatcherMetrics()
        from tasks.dataset import built_guards

        # every reason exported at 0 from the start: an increase() is 0, not absent
        for reason in [*REASONS, *(f"guard:{g}" for g in built_guards(settings))]:
            self.metrics.rejections.labels(reason)
        folder = settings.home / "serving"
        self.state_path = folder / "watcher.json"
        self.decisions_path = folder / "gate-decisions.jsonl"
        self.judged = self._load_state()
        # passed the gate, promote not acknowledged (server down): version -> (vs, decision)
        self._pending: dict[str, tuple[str, GateDecision]] = {}

    def _load_state(self) -> dict[str, dict[str, Any]]:
        if not self.state_path.exists():
            return {}
        try:
            return dict(json.loads(self.state_path.read_text())["judged"])
        except (ValueError, KeyError, TypeError) as exc:  # judging again is safe
            log.warning("ignoring %s (%s): bundles may be judged again", self.state_path, exc)
            return {}

    def _finish(self, version: str, incumbent: str, outcome: str, reason: str | None,
                decision: GateDecision | None, error: str | None = None) -> None:
        """Append the decision, remember the version as judged (both before returning)."""
        now = datetime.now(UTC).isoformat()
        cards = [self._card_field(v, "teacher_version") for v in (version, incumbent)]
        entry = {"time": now, "candidate": version, "incumbent": incumbent,
                 "outcome": outcome, "reason": reason, "error": error,
                 "candidate_teacher": cards[0], "incumbent_teacher": cards[1],
                 "teacher_mismatch": cards[0] != cards[1],
                 "decision": decision.to_json() if decision else None}
        self.decisions_path.parent.mkdir(parents=True, exist_ok=True)
        with self.decisions_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
        self.judged[version] = {"outcome": outcome, "reason": reason, "time": now,
                                "incumbent": incumbent}
        atomic_write_json(self.state_path, {"judged": self.judged})

    def _card_field(self, version: str, name: str) -> Any:
        try:
            return getattr(self.registry.load_card(version), name)
        except (BundleError, ValueError, OSError):
            return None

    def candidates(self, serving: str | None) -> list[str]:
        """Bundles created after ``serving``, not judged yet, oldest first."""
        base = self._card_field(serving, "created_at") if serving else None
        since = datetime.fromisoformat(base) if base else None
        out = []
        for version in self.registry.versions():
            if version == serving or version in self.judged:
                continue
            try:
                card = self.registry.load_card(version)
            except (BundleError, ValueError, OSError):
                continue  # removed or unreadable since the listing: next poll sees it
            if since is not None and datetime.fromisoformat(card.created_at) <= since:
                continue
            if self.trainer_only and not card.source.get("trainer"):
                continue
            out.append(version)
        return out

    def _reject(self, version: str, incumbent: str, reason: str, result: PollResult,
                decision: GateDecision | None, error: str | None = None) -> bool:
        self.metrics.rejections.labels(reason).inc()
        result.rejected[version] = reason
        log.warning("not promoting %s over %s (%s): %s", version, incumbent, reason,
                    error or (decision.reason if decision else ""))
        self._finish(version, incumbent, "rejected", reason, decision, error)
        return False

    def _consider(self, version: str, incumbent: str, result: PollResult) -> bool:
        """Judge one bundle and act on it; True when it now serves. Outages escape."""
        pending = self._pending.get(version)
        if pending is not None and pending[0] == incumbent:
            decision = pending[1]  # passed already; only the promote failed
        else:
            try:
                decision = judge_bundle(self.settings, self.store, version, incumbent,
                                        self.gate)
            except IncumbentUnavailable:
                raise
            except BundleError as exc:
                return self._reject(version, incumbent, "load_failed", result, None, str(exc))
            self.metrics.judged.inc()
            self.metrics.last_decision.set(time.time())
            result.judged.append(version)
            if not decision.promote:
                return self._reject(version, incumbent, rejection_reason(decision), result,
                                    decision)
            self._pending[version] = (incumbent, decision)
        try:
            self.client.promote(version)
        except ServerRefused as exc:  # e.g. its probe failed on the server
            self._pending.pop(version, None)
            return self._reject(version, incumbent, "promote_refused", result, decision,
                                str(exc))
        self._pending.pop(version, None)
        self.metrics.promotions.inc()
        result.promoted.append(version)
        log.warning("promoted %s over %s: %s", version, incumbent, decision.reason)
        self._finish(version, incumbent, "promoted", None, decision)
        return True

    def run_once(self) -> PollResult:
        """One poll: every new bundle against what the *server* says serves (else the
        registry pointer). An outage (:data:`_OUTAGES`) ends it with ``error`` set and
        nothing marked judged, so the next poll retries; it never raises for one."""
        result = PollResult()
        try:
            serving = self.client.serving() or self.registry.pointer().serving
            result.serving = serving
            if serving is None:
                result.error = "no serving bundle: nothing to judge against"
                return result
            for version in self.candidates(serving):
                if self._consider(version, serving, result):
                    serving = result.serving = version
        except tuple(_OUTAGES) as exc:
            kind = next(k for t, k in _OUTAGES.items() if isinstance(exc, t))
            self.metrics.errors.labels(kind).inc()
            result.error = f"{kind}: {exc}"
            log.warning("watcher poll stopped (%s); retrying in %.0f s", result.error,
                        self.interval_s)
        return result

    def run_forever(self, stop_event: threading.Event,
                    on_poll: Callable[[PollResult], None] | None = None) -> None:
        """Poll every ``interval_s`` until ``stop_event`` is set. A bug in one poll is
        logged with its traceback and the next poll still runs: a dead watcher would
        stop every promotion silently."""
        while not stop_event.is_set():
            try:
                result = self.run_once()
            except Exception:
                log.exception("watcher poll failed; retrying in %.0f s", self.interval_s)
            else:
                if on_poll is not None:
                    on_poll(result)
            stop_event.wait(self.interval_s)

    def serve_metrics(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Prometheus ``/metrics`` on ``addr:port`` in a daemon thread; returns the server."""
        server, _thread = start_http_server(port, addr, registry=self.metrics.registry)
        return server


def _print(result: PollResult) -> None:
    lines = [f"promoted {v}" for v in result.promoted] + [
        f"rejected {v} ({why})" for v, why in result.rejected.items()] + [result.error or ""]
    for line in filter(None, lines):
        cli.console.print(line, markup=False, soft_wrap=True)


def watch_command(
    server_url: Annotated[str | None, typer.Option(
        help="the server (default watcher.server_url, else http://serving.host:serving.port)"
    )] = None,
    interval: Annotated[float | None, typer.Option(
        min=0.1, help="seconds between polls (default watcher.interval_s, 30)")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="Prometheus /metrics port (default watcher.metrics_port; 0 = off)")] = None,
    metrics_host: Annotated[str | None, typer.Option(
        help="address /metrics binds (default watcher.metrics_host)")] = None,
    trainer_only: Annotated[bool, typer.Option(
        help="only bundles whose card source names a trainer")] = False,
    once: Annotated[bool, typer.Option(help="poll once and exit")] = False,
) -> None:
    """Promote new bundles that pass the non-inferiority gate against the serving one."""
    from stores import open_configured_store

    s = cli.settings()
    cfg, w = s.serving, s.watcher
    if not cfg.admin_api_key:
        raise cli.fail(ValueError("the watcher promotes through /v1/admin: set "
                                  "serving.admin_api_key (CODISTILL_SERVING__ADMIN_API_KEY) "
                                  "to the server's key"))
    url = server_url or w.server_url or cfg.local_url
    interval = interval if interval is not None else w.interval_s
    metrics_port = w.metrics_port if metrics_port is None else metrics_port
    metrics_host = metrics_host or w.metrics_host
    try:
        store = open_configured_store(s)
    except StoreError as exc:
        raise cli.fail(exc) from None
    gate = cfg.gate
    watcher = Watcher(s, store, url, cfg.admin_api_key, gate=gate, interval_s=interval,
                      trainer_only=trainer_only)
    metrics = watcher.serve_metrics(metrics_port, metrics_host) if metrics_port else None
    try:
        if once:
            result = watcher.run_once()
            cli.out.print_json(data=dataclasses.asdict(result))
            if result.error:
                raise cli.fail(RuntimeError(result.error))
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the poll, then exit
        cli.console.print(f"watching {s.bundles_dir} for {url} every {interval:g} s "
                          f"({gate.mode}, tolerance {gate.tolerance})")
        watcher.run_forever(stop, on_poll=_print)
    finally:
        if metrics is not None:
            metrics.shutdown()
        store.close()
