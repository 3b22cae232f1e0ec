"""End-to-end events/s of the closed loop: simulator -> server -> labeller and trainer.

    python benchmarks/closed_loop.py --seed-home artifacts/exp-demo   # demo, both backends
    python benchmarks/closed_loop.py --size small --backends embedded
    python benchmarks/closed_loop.py --quick --home H                 # seconds: the test suite

For each backend (``embedded``: the SQLite store and the on-disk event log;
``kafka-redis``: Redis and Kafka, on private ports unless ``--redis-url`` /
``--kafka-bootstrap`` or ``CODISTILL_TEST_REDIS_URL`` / ``CODISTILL_TEST_KAFKA`` name
running ones) one run, each stage a subprocess with the stack's command
(``scripts/stack.sh commands``):

* **server** ``codistill serve`` (``/metrics``: rank requests, events written, queue);
* **labeller** ``codistill teacher label --follow`` (``labeller.metrics_port``);
* **trainer** ``codistill student online --init-student current --lr 1e-4
  --max-batch-wait-s 2`` with ``online.labeller=true`` (new candidates are pending, not
  dead letters); the stack's ``--publish-every`` is left out: no watcher here. Its join
  window is 10 s (``--window-s``; ``online.window_s`` is 60; ``--quick``: 2 s), as in
  tests/integration/test_stack.py, so impressions are trained on within the run; the
  last window's impressions wait for newer events (a live trainer's watermark is event
  time) and are reported as ``impressions_waiting``;
* **simulator** ``codistill simulate --ranker server --rate 0`` for ``--impressions``
  visits, as fast as the server answers (its summary JSON gives its events/s).

While it runs a sampler in this process reads, every ``--sample-interval`` seconds, each
stage's ``/metrics`` and the event log itself (end offsets, the labeller's and the
trainer's committed offsets). After the simulator ends: how long the labeller and the
trainer take to *drain* (everything in the log labelled / applied; ``--drain-timeout``),
then the trainer's commit that covers every event: its last batch's checkpoint, if that
batch made one (every ``online.checkpoint_every`` batches), else the one it writes when
it is stopped, once both have drained; ``commit`` says which. So the end-to-end time includes the slower of the two
(the labeller, on CPU) and the trainer's final checkpoint. Then everything is stopped
(SIGTERM, then SIGKILL of the process group), and so are the services started here.

Per backend: the simulator's events/s, the server's rank requests/s, the labeller's
events/s and candidates/s and the trainer's events/s (each: the events of the run over
the time from the first request to that stage's catching up), every stage's max and
final lag in events and seconds (server: its event queue, and request -> append time of
each record; labeller: its own gauges; trainer: its lag gauges, and the age of the oldest
record it had not applied yet), drain seconds, **end-to-end events/s** = events produced
/ (first request -> the trainer's commit covering them), errors, the load average. The
1 Hz timeline lies in ``HOME/<backend>/timeline.json``.

Homes: ``HOME/base`` is prepared once (``codistill stack prepare``, embedded; a
``--seed-home`` is copied there first, runtime folders left out); each backend runs on a
fresh copy ``HOME/<backend>`` (kafka-redis: ``stack prepare`` again with its env, which
writes the teacher vectors into Redis from the teacher cache). ``--no-prepare`` takes
the base as prepared (kafka-redis: only ``teacher precompute`` of its splits). Every
process's log is in ``HOME/<backend>/logs/``. Writes
``benchmarks/results/closed-loop.json``; ``--quick`` (small, 100 impressions) writes
``HOME/closed-loop-quick.json`` (HOME: a temporary folder unless given).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.common import RESULTS, machine, private_services, write_result  # noqa: E402
from codistill.app.processes import (  # noqa: E402
    App,
    Metrics,
    StageFailed,
    backend_env,
    base_env,
    cleanup_shared,
    copy_home,
    free_port,
    run_cli,
    scrape,
    total,
    until,
    wait_ready,
)
from codistill.config import OnlineTrainerConfig  # noqa: E402

console = Console()
BACKENDS = ("embedded", "kafka-redis")
SERVER = ["serve"]
LABELLER = ["teacher", "label", "--follow"]
TRAINER = ["student", "online", "--init-student", "current", "--lr", "1e-4",
           "--max-batch-wait-s", "2"]
CHECKPOINT_EVERY = OnlineTrainerConfig().checkpoint_every  # the trainer runs with defaults


def server_values(m: Metrics) -> dict[str, float]:
    req = "codistill_serving_requests_total"
    return {"rank_ok": total(m, req, endpoint="/v1/rank", status="200"),
            "feedback_ok": total(m, req, endpoint="/v1/feedback", status="200"),
            "non_2xx": sum(v for labels, v in m.get(req, [])
                           if not labels.get("status", "").startswith("2")),
            "queue": total(m, "codistill_serving_event_queue_depth"),
            "events": total(m, "codistill_serving_events_total"),
            "dropped": total(m, "codistill_serving_events_dropped_total"),
            "broker_errors": total(m, "codistill_serving_broker_errors_total"),
            "fallbacks": total(m, "codistill_serving_fallback_candidates_total"),
            "candidates": total(m, "codistill_serving_candidates_total")}


def labeller_values(m: Metrics) -> dict[str, float]:
    p = "codistill_labeller_"
    return {"lag_events": total(m, p + "lag_events"), "lag_seconds": total(m, p + "lag_seconds"),
            "events": total(m, p + "events_total"),
            "invalid": total(m, p + "events_total", kind="invalid"),
            "candidates": total(m, p + "candidates_embedded_total"),
            "queries": total(m, p + "queries_labelled_total"),
            "missing_text": total(m, p + "missing_text_total")}


def trainer_values(m: Metrics) -> dict[str, Any]:
    p = "codistill_trainer_"
    return {"consumed": total(m, p + "events_consumed_total"),
            "lag": {labels["partition"]: v for labels, v in m.get(p + "lag", [])},
            "batches": total(m, p + "batches_applied_total"),
            "steps": total(m, p + "optimizer_steps_total"),
            "joined": total(m, p + "impressions_joined_total"),
            "label_hits": total(m, p + "label_hits_total"),
            "label_misses": total(m, p + "label_misses_total"),
            "dlq": total(m, "codistill_dlq_events_total")}


class Sampler(threading.Thread):
    """Every ``interval`` s: each stage's metrics and the log's offsets (stage -> partition)."""

    def __init__(self, stream: Any, topic: str, groups: dict[str, str], urls: dict[str, str],
                 interval: float) -> None:
        super().__init__(name="closed-loop-sampler", daemon=True)
        self.stream, self.topic, self.groups, self.urls = stream, topic, groups, urls
        self.interval, self.samples, self.errors = interval, [], []
        self.partitions = sorted(stream.partitions(topic))
        self._stop_event, self._lock = threading.Event(), threading.Lock()
        self.extract = {"server": server_values, "labeller": labeller_values,
                        "trainer": trainer_values}

    def sample(self) -> dict[str, Any]:
        t = time.time()
        s: dict[str, Any] = {"t": t, "load1": os.getloadavg()[0],
                             "end": {p: self.stream.end_offset(self.topic, p) for p in self.partitions}}
        for stage, group in self.groups.items():
            s[f"{stage}_committed"] = {p: self.stream.committed(group, self.topic, p) or 0
                                       for p in self.partitions}
        for stage, url in self.urls.items():
            m = scrape(url)
            s[stage] = None if m is None else self.extract[stage](m)
        return s

    def take(self) -> dict[str, Any] | None:
        """One sample now (also callable from the main thread while the sampler is stopped)."""
        with self._lock:
            try:
                s = self.sample()
            except Exception as exc:  # a broker hiccup: note it, keep sampling
                if len(self.errors) < 20:
                    self.errors.append(repr(exc))
                return None
            self.samples.append(s)
            return s

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.take()
            self._stop_event.wait(self.interval)

    def latest(self, stage: str | None = None) -> dict[str, Any] | None:
        """The newest sample (with ``stage``'s metrics, if named)."""
        for s in reversed(self.samples):
            if stage is None or s.get(stage) is not None:
                return s
        return None

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)


def first_time(samples: list[dict[str, Any]], ok: Callable[[dict[str, Any]], bool]
               ) -> float | None:
    return next((s["t"] for s in list(samples) if ok(s)), None)


# -- homes and settings -----------------------------------------------------------------------
def check_prepared(home: Path) -> None:
    for what in ("students/current.json", "bundles/serving.json", "teachers/current.json"):
        if not (home / what).exists():
            raise SystemExit(f"{home} is not a prepared home ({what} missing): run without "
                             "--no-prepare, or give a --seed-home that `codistill stack prepare` made")


def open_run_stream(home: Path, env: dict[str, str]) -> tuple[Any, str]:
    from codistill.config import StreamSettings
    from streaming import open_stream

    kafka = env.get("CODISTILL_STREAM__BACKEND") == "kafka"
    topic = env.get("CODISTILL_STREAM__TOPIC", "codistill.events")
    settings = StreamSettings(
        backend="kafka" if kafka else "embedded", path=home / "events", topic=topic,
        dlq_topic=env.get("CODISTILL_STREAM__DLQ_TOPIC", "codistill.events.dlq"),
        bootstrap_servers=env.get("CODISTILL_STREAM__BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    stream = open_stream(settings)
    stream.ensure_topics()
    return stream, topic


def log_records(stream: Any, topic: str, partitions: list[int]) -> dict[int, list[tuple[float, float, bool]]]:
    """Per partition, each record's (append time, event time, is impression), by offset."""
    from streaming.events import Impression, InvalidEvent, parse_event

    out: dict[int, list[tuple[float, float, bool]]] = {}
    for p in partitions:
        rows: list[tuple[float, float, bool]] = []
        end, offset = stream.end_offset(topic, p), stream.start_offset(topic, p)
        while offset < end:
            records = stream.read(topic, p, offset, min(500, end - offset))
            if not records:
                break
            for r in records:
                try:
                    event = parse_event(r.value)
                    rows.append((r.timestamp_ms / 1000, event.event_time.timestamp(),
                                 isinstance(event, Impression)))
                except InvalidEvent:
                    rows.append((r.timestamp_ms / 1000, r.timestamp_ms / 1000, False))
            offset = records[-1].offset + 1
        out[p] = rows
    return out


# -- one backend ------------------------------------------------------------------------------
def stat(values: list[float]) -> dict[str, float | None]:
    return {"max": round(max(values), 3) if values else None,
            "final": round(values[-1], 3) if values else None}


def rate(n: float, seconds: float | None) -> float | None:
    return round(n / seconds, 1) if seconds and seconds > 0 else None


def run_backend(backend: str, base: Path, home: Path, args: argparse.Namespace,
                services: dict[str, str], prepared_s: float | None) -> dict[str, Any]:
    run_home = home / backend
    logs = run_home / "logs"
    copy_home(base, run_home)
    tag = f"cl-{uuid.uuid4().hex[:8]}"
    backend_vars = backend_env(backend, services, tag)
    env = {**base_env(run_home, args.size), **backend_vars}
    load_start = os.getloadavg()[0]
    result: dict[str, Any] = {"store": "redis" if backend_vars else "embedded",
                              "stream": "kafka" if backend_vars else "embedded",
                              "services": dict(services) if backend_vars else {},
                              "namespace": tag if backend_vars else None,
                              "topic": backend_vars.get("CODISTILL_STREAM__TOPIC",
                                                        "codistill.events"),
                              "home": str(run_home)}
    console.rule(f"{backend}: {run_home}")
    if backend == "embedded":
        result["prepare_s"] = prepared_s
    elif not args.no_prepare:
        result["prepare_s"] = run_cli("prepare", ["stack", "prepare"], env, logs, args.prepare_timeout)
    else:  # a prepared base: only the teacher vectors of its splits into Redis (cached)
        data = [f for sp in ("train", "valid", "test")
                if (f := run_home / "data" / args.size / f"{sp}.jsonl").exists()]
        result["prepare_s"] = run_cli("precompute", ["teacher", "precompute", *(
            a for f in data for a in ("--data", str(f)))], env, logs, args.prepare_timeout)
    ports = {k: free_port() for k in ("server", "labeller", "trainer")}
    env.update({"CODISTILL_SERVING__PORT": str(ports["server"]),
                "CODISTILL_LABELLER__METRICS_PORT": str(ports["labeller"]),
                "CODISTILL_ONLINE__METRICS_PORT": str(ports["trainer"]),
                "CODISTILL_ONLINE__LABELLER": "true",
                "CODISTILL_ONLINE__WINDOW_S": str(args.window_s),
                "CODISTILL_ONLINE__ALLOWED_LATENESS_S": str(args.allowed_lateness_s),
                "CODISTILL_LABELLER__GROUP": f"{tag}-labeller",
                "CODISTILL_ONLINE__GROUP": f"{tag}-trainer"})
    server_url = f"http://127.0.0.1:{ports['server']}"
    urls = {"server": f"{server_url}/metrics",
            "labeller": f"http://127.0.0.1:{ports['labeller']}/metrics",
            "trainer": f"http://127.0.0.1:{ports['trainer']}/metrics"}
    apps = {"server": App("server", SERVER, env, logs), "labeller": App("labeller", LABELLER, env, logs),
            "trainer": App("trainer", TRAINER, env, logs)}
    sim = App("simulate", ["simulate", "--ranker", "server", "--server-url", server_url, "--rate",
                           "0", "--impressions", str(args.impressions), "--seed", "0"], env, logs)
    stream, topic = open_run_stream(run_home, env)
    try:
        return measure(run_home, result, apps, sim, env, urls, server_url, stream, topic,
                       load_start, args)
    finally:
        stream.close()
        if backend_vars and not args.private_services:
            cleanup_shared(backend_vars, tag)


def measure(run_home: Path, result: dict[str, Any], apps: dict[str, App], sim: App,
            env: dict[str, str], urls: dict[str, str], server_url: str, stream: Any, topic: str,
            load_start: float, args: argparse.Namespace) -> dict[str, Any]:
    """Start the stages, simulate, drain, stop; the backend's numbers."""
    sampler: Sampler | None = None
    drain: dict[str, Any] = {"timeout_s": args.drain_timeout}
    try:
        for app in apps.values():
            app.start()
        wait_ready([(apps["server"], f"{server_url}/readyz"), (apps["labeller"], urls["labeller"]),
                    (apps["trainer"], urls["trainer"])], args.start_timeout)
        result["startup_s"] = {k: a.ready_s for k, a in apps.items()}
        console.print(f"stages ready {result['startup_s']}; simulating {args.impressions} visits")
        sampler = Sampler(stream, topic, {"labeller": env["CODISTILL_LABELLER__GROUP"],
                                          "trainer": env["CODISTILL_ONLINE__GROUP"]},
                          urls, args.sample_interval)
        sampler.start()
        sim.start()
        while sim.wait(0.25) is None:
            for app in apps.values():
                if not app.alive():
                    sim.stop(10)
                    raise app.fail("exited while the simulator ran")
            if time.time() - sim.started > args.sim_timeout:
                sim.stop(10)
                raise sim.fail(f"still running after {args.sim_timeout:.0f} s")
        sim_end = sim.exited_at
        summary = sim.stdout_json()
        if sim.rc != 0 or summary is None:
            raise sim.fail(f"failed (rc {sim.rc})")
        result["simulator"] = {k: summary.get(k) for k in (
            "impressions", "clicks", "events_written", "errors", "seconds", "events_per_s",
            "model_version", "mean_propensity")}
        console.print(f"simulator: {summary['events_written']} events in {summary['seconds']} s; "
                      "draining")

        def log_settled() -> bool:  # the server's queue is empty and all it wrote is in the log
            s = sampler.latest("server")
            return bool(s and s["t"] > sim_end and s["server"]["queue"] == 0
                        and sum(s["end"].values()) >= s["server"]["events"])

        drain["log_settled"] = until(log_settled, 30)
        now = sampler.take() or sampler.latest()
        produced = sum(now["end"].values())

        def labelled() -> bool:
            s = sampler.latest()
            return bool(s and sum(s["labeller_committed"].values()) >= produced)

        def applied() -> bool:
            s = sampler.latest("trainer")
            return bool(s and s["trainer"]["consumed"] >= produced)

        def committed() -> bool:
            s = sampler.latest()
            return bool(s and sum(s["trainer_committed"].values()) >= produced)

        def done() -> bool:
            for app in apps.values():
                if not app.alive():
                    raise app.fail("exited while the loop drained")
            return labelled() and applied()

        deadline = sim_end + args.drain_timeout
        drain["drained"] = until(done, max(deadline - time.time(), 0))
        # the trainer commits at its checkpoints, every online.checkpoint_every batches: when
        # its last batch made one, that commit covers every event (wait for it); else the
        # commit it writes when stopped (now: the labeller has caught up too) covers the rest
        last = sampler.latest("trainer")
        due = bool(last and last["trainer"]["batches"] % CHECKPOINT_EVERY == 0)
        drain["commit"] = ("checkpoint" if committed() or (due and until(committed, args.commit_wait))
                           else "stop")
        stop_t = time.time()
        apps["trainer"].terminate()
        while apps["trainer"].alive() and time.time() - stop_t < args.stop_timeout:
            sampler.take()  # 0.1 s apart: the stop commit's time (it exports its student after)
            time.sleep(0.1)
        apps["trainer"].stop(args.stop_timeout)
        sampler.take()
        drain["trainer_stop_s"] = round(time.time() - stop_t, 1)
    finally:
        if sampler is not None:
            sampler.stop()
        order = [sim, apps["trainer"], apps["labeller"], apps["server"]]
        for app in order:  # all at once: each drains on its own
            app.terminate()
        for app in order:
            app.stop(args.stop_timeout)
    everything = [sim, *apps.values()]
    left = [a.name for a in everything if a.left_running()]
    records = log_records(stream, topic, sampler.partitions)
    result.update(analyse(sampler, records, produced, sim_end, summary, apps, drain))
    result["left_running"] = left
    result["exit_codes"] = {a.name: a.rc for a in everything}
    result["load_average"] = {"1m_at_start": load_start, "1m_at_end": os.getloadavg()[0],
                              "1m_max": max((s["load1"] for s in sampler.samples), default=None)}
    errors = result["errors"]
    errors["process_exit_codes"] = sum(rc not in (0, None) for rc in result["exit_codes"].values())
    errors["left_running"] = len(left)
    errors["sampler"] = len(sampler.errors)
    result["error_total"] = sum(v for v in errors.values() if isinstance(v, int | float))
    result["sampler_errors"] = sampler.errors
    timeline = run_home / "timeline.json"
    timeline.write_text(json.dumps(timeline_rows(sampler.samples, result["first_request_at_unix"])))
    result["timeline"] = str(timeline)
    return result


def analyse(sampler: Sampler, records: dict[int, list[tuple[float, float, bool]]], produced: int,
            sim_end: float, summary: dict[str, Any], apps: dict[str, App],
            drain: dict[str, Any]) -> dict[str, Any]:
    samples = sampler.samples
    in_log = sum(len(r) for r in records.values())
    starts = [ev for rows in records.values() for _, ev, imp in rows if imp]
    t0 = min(starts) if starts else sampler.samples[0]["t"]
    t_labelled = first_time(samples, lambda s: sum(s["labeller_committed"].values()) >= produced)
    t_applied = first_time(samples, lambda s: s.get("trainer") is not None
                           and s["trainer"]["consumed"] >= produced)
    t_committed = first_time(samples, lambda s: sum(s["trainer_committed"].values()) >= produced)

    def since(t: float | None) -> float | None:
        return round(t - t0, 3) if t is not None else None

    def drained(t: float | None) -> float | None:
        return round(max(t - sim_end, 0.0), 3) if t is not None else None

    srv = [s["server"] for s in samples if s.get("server")]
    lab = [s["labeller"] for s in samples if s.get("labeller")]
    trn = [s for s in samples if s.get("trainer")]
    last_srv, last_lab = (srv[-1] if srv else {}), (lab[-1] if lab else {})
    last_trn = trn[-1]["trainer"] if trn else {}
    server_lag_s = [max(append - ev, 0.0) for p in sorted(records) for append, ev, _ in records[p]]
    newest = max(((append, max(append - ev, 0.0)) for rows in records.values()
                  for append, ev, _ in rows), default=(0.0, None))
    trainer_lag_events = [sum(s["trainer"]["lag"].values()) for s in trn]
    trainer_lag_s = [oldest_unapplied_age(s, records) for s in trn]
    sim_s = summary.get("seconds") or None
    labeller_summary, trainer_summary = apps["labeller"].stdout_json(), apps["trainer"].stdout_json()
    out: dict[str, Any] = {
        "events_produced": produced,
        "events_in_log": in_log,
        "first_request_at_unix": t0,
        "server": {
            "rank_requests": last_srv.get("rank_ok"), "feedback_requests": last_srv.get("feedback_ok"),
            "rank_requests_per_s": rate(last_srv.get("rank_ok", 0), sim_s),
            "rank_requests_per_s_peak": peak_rate(samples, "server", "rank_ok"),
            "events_written": last_srv.get("events"),
            "fallback_share": (round(last_srv["fallbacks"] / last_srv["candidates"], 4)
                               if last_srv.get("candidates") else None),
            "lag": {"events": stat([s["queue"] for s in srv]),
                    "seconds": {"max": round(max(server_lag_s), 3) if server_lag_s else None,
                                "final": None if newest[1] is None else round(newest[1], 3)},
                    "what": "events: the event queue; seconds: request -> append to the log"}},
        "labeller": {
            "events": last_lab.get("events"), "candidates_embedded": last_lab.get("candidates"),
            "queries_labelled": last_lab.get("queries"),
            "events_per_s": rate(produced, since(t_labelled)),
            "candidates_per_s": rate(last_lab.get("candidates", 0), since(t_labelled)),
            "caught_up_s": since(t_labelled), "drain_s": drained(t_labelled),
            "lag": {"events": stat([s["lag_events"] for s in lab]),
                    "seconds": stat([s["lag_seconds"] for s in lab]),
                    "what": "its gauges codistill_labeller_lag_events / _lag_seconds"},
            "summary": labeller_summary},
        "trainer": {
            "events": last_trn.get("consumed"), "batches": last_trn.get("batches"),
            "optimizer_steps": last_trn.get("steps"),
            "impressions_trained": last_trn.get("joined"),
            "impressions_waiting": (None if last_trn.get("joined") is None else
                                    int(summary.get("impressions", 0) - last_trn["joined"])),
            "label_hits": last_trn.get("label_hits"),
            "label_misses": last_trn.get("label_misses"),
            "events_per_s": rate(produced, since(t_applied)),
            "applied_s": since(t_applied), "drain_s": drained(t_applied),
            "committed_s": since(t_committed), "commit": drain.get("commit"),
            "stop_s": drain.get("trainer_stop_s"),
            "lag": {"events": stat(trainer_lag_events), "seconds": stat(trainer_lag_s),
                    "what": "events: sum of codistill_trainer_lag; seconds: age of the oldest "
                            "record not applied yet"},
            "summary": None if trainer_summary is None else {
                k: trainer_summary.get(k) for k in ("batches", "optimizer_steps", "offsets",
                                                    "interrupted", "counters", "joiner")}},
        "end_to_end": {
            "events": produced, "seconds": since(t_committed),
            "events_per_s": rate(produced, since(t_committed)),
            "applied_seconds": since(t_applied),
            "applied_events_per_s": rate(produced, since(t_applied)),
            "from": "the first impression's event time (the first request served)",
            "to": "the first sample in which the trainer's committed offsets cover every event "
                  "(see trainer.commit: a checkpoint's, or its stop commit once labeller and "
                  "trainer had drained); applied: its events_consumed counter does"},
        "drain": drain,
    }
    out["errors"] = {
        "simulator": summary.get("errors", 0),
        "server_non_2xx": last_srv.get("non_2xx", 0),
        "server_events_dropped": last_srv.get("dropped", 0),
        "server_broker_errors": last_srv.get("broker_errors", 0),
        "labeller_invalid": last_lab.get("invalid", 0),
        "trainer_dead_letters": last_trn.get("dlq", 0),
        "events_lost": max(int(summary.get("events_written") or 0) - produced, 0),
        "not_drained": int(not drain.get("drained", False)),
        "not_committed": int(t_committed is None),
    }
    return out


def oldest_unapplied_age(s: dict[str, Any], records: dict[int, list[tuple[float, float, bool]]]
                         ) -> float:
    """Seconds the oldest record the trainer had not applied at sample ``s`` had been in the
    log (its position: our end offset minus its lag gauge; 0 when nothing waits)."""
    ages = [0.0]
    for p, end in s["end"].items():
        lag = s["trainer"]["lag"].get(str(p), end)
        pos = int(max(end - lag, 0))
        if pos < end and pos < len(records.get(p, [])):
            ages.append(max(s["t"] - records[p][pos][0], 0.0))
    return max(ages)


def peak_rate(samples: list[dict[str, Any]], stage: str, key: str, window: float = 1.0) -> float | None:
    best, pts = None, [(s["t"], s[stage][key]) for s in samples if s.get(stage)]
    j = 0
    for i in range(len(pts)):
        while pts[i][0] - pts[j][0] > window * 1.5:
            j += 1
        if pts[i][0] - pts[j][0] >= window:
            r = (pts[i][1] - pts[j][1]) / (pts[i][0] - pts[j][0])
            best = r if best is None else max(best, r)
    return None if best is None else round(best, 1)


def timeline_rows(samples: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    cols = ["t_s", "produced", "server_queue", "labeller_committed", "labeller_lag_events",
            "labeller_lag_s", "trainer_consumed", "trainer_committed", "trainer_lag_events",
            "load1"]
    rows, last = [], -1e9
    for s in samples:
        if s["t"] - last < 0.95:
            continue
        last = s["t"]
        srv, lab, trn = s.get("server") or {}, s.get("labeller") or {}, s.get("trainer") or {}
        rows.append([round(s["t"] - t0, 2), sum(s["end"].values()), srv.get("queue"),
                     sum(s["labeller_committed"].values()), lab.get("lag_events"),
                     lab.get("lag_seconds"), trn.get("consumed"),
                     sum(s["trainer_committed"].values()),
                     sum(trn["lag"].values()) if trn else None, s["load1"]])
    return {"columns": cols, "rows": rows}


# -- the run ----------------------------------------------------------------------------------
def print_table(results: dict[str, dict[str, Any]], impressions: int, size: str) -> None:
    def f(v: Any, unit: str = "") -> str:
        if v is None:
            return "-"
        return f"{v:,.1f}{unit}" if isinstance(v, float) else f"{v}{unit}"

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("events produced", lambda r: f(r["events_produced"])),
        ("simulator events/s", lambda r: f(r["simulator"]["events_per_s"])),
        ("server rank requests/s (peak)", lambda r: f"{f(r['server']['rank_requests_per_s'])} "
                                                    f"({f(r['server']['rank_requests_per_s_peak'])})"),
        ("labeller events/s", lambda r: f(r["labeller"]["events_per_s"])),
        ("labeller candidates/s", lambda r: f(r["labeller"]["candidates_per_s"])),
        ("trainer events/s", lambda r: f(r["trainer"]["events_per_s"])),
        ("trainer impressions trained / steps", lambda r: f"{f(r['trainer']['impressions_trained'])}"
                                                          f" / {f(r['trainer']['optimizer_steps'])}"),
        ("end-to-end events/s", lambda r: f(r["end_to_end"]["events_per_s"])),
        ("end to end (first request -> commit)", lambda r: f(r["end_to_end"]["seconds"], " s")),
        ("trainer commit", lambda r: f(r["trainer"]["commit"])),
        ("server lag max: events / s", lambda r: lag(r["server"])),
        ("labeller lag max: events / s", lambda r: lag(r["labeller"])),
        ("trainer lag max: events / s", lambda r: lag(r["trainer"])),
        ("labeller drain", lambda r: f(r["labeller"]["drain_s"], " s")),
        ("trainer drain", lambda r: f(r["trainer"]["drain_s"], " s")),
        ("errors", lambda r: f(r["error_total"])),
        ("load average (1 min, max)", lambda r: f(r["load_average"]["1m_max"])),
    ]

    def lag(stage: dict[str, Any]) -> str:
        return f"{f(stage['lag']['events']['max'])} / {f(stage['lag']['seconds']['max'])}"

    table = Table(title=f"closed loop: {impressions} impressions, size {size}")
    table.add_column("")
    for name in results:
        table.add_column(name, justify="right")
    for label, get in rows:
        table.add_row(label, *(get(r) for r in results.values()))
    console.print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("small", "demo"), default=None,
                    help="data size (default demo; small with --quick)")
    ap.add_argument("--impressions", type=int, default=None, help="default 2000 (--quick 100)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of "
                    + ", ".join(BACKENDS))
    ap.add_argument("--quick", action="store_true", help="small, 100 impressions, results in HOME")
    ap.add_argument("--home", type=Path, default=None, help="default artifacts/closed-loop-SIZE "
                    "(--quick: a temporary folder)")
    ap.add_argument("--seed-home", type=Path, default=None, help="a prepared home copied to "
                    "HOME/base when that does not exist yet (e.g. artifacts/exp-demo)")
    ap.add_argument("--no-prepare", action="store_true", help="HOME/base is prepared: no "
                    "`stack prepare` (kafka-redis: `teacher precompute` of its splits only)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--redis-url", default=os.environ.get("CODISTILL_TEST_REDIS_URL"))
    ap.add_argument("--kafka-bootstrap", default=os.environ.get("CODISTILL_TEST_KAFKA"))
    ap.add_argument("--sample-interval", type=float, default=0.5)
    ap.add_argument("--window-s", type=float, default=None, help="the trainer's join window "
                    "(online.window_s, 60 by default); here 10 as in tests/integration/"
                    "test_stack.py (--quick: 2, its traffic lasts seconds)")
    ap.add_argument("--allowed-lateness-s", type=float, default=None, help="default 2 (--quick 0.5)")
    ap.add_argument("--drain-timeout", type=float, default=None, help="default 600 (--quick 120)")
    ap.add_argument("--commit-wait", type=float, default=30.0, help="s to wait for the "
                    "checkpoint commit the trainer's last batch made, if it made one")
    ap.add_argument("--sim-timeout", type=float, default=None, help="default 1200 (--quick 180)")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--stop-timeout", type=float, default=120.0)
    ap.add_argument("--prepare-timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    args.size = args.size or ("small" if args.quick else "demo")
    args.impressions = args.impressions or (100 if args.quick else 2000)
    args.drain_timeout = args.drain_timeout or (120.0 if args.quick else 600.0)
    args.window_s = args.window_s if args.window_s is not None else 2.0 if args.quick else 10.0
    args.allowed_lateness_s = (args.allowed_lateness_s if args.allowed_lateness_s is not None
                               else 0.5 if args.quick else 2.0)
    args.sim_timeout = args.sim_timeout or (180.0 if args.quick else 1200.0)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if bad := [b for b in args.backends if b not in BACKENDS]:
        ap.error(f"unknown backend(s) {bad}; known: {', '.join(BACKENDS)}")
    return args


@contextmanager
def services_for(args: argparse.Namespace, home: Path) -> Iterator[dict[str, str]]:
    """Redis and Kafka for kafka-redis: the named ones, else private instances."""
    given = {"redis": args.redis_url, "kafka": args.kafka_bootstrap}
    missing = [n for n, v in given.items() if not v]
    args.private_services = bool(missing)
    if not missing:
        yield dict(given)  # type: ignore[arg-type]
        return
    with private_services(missing, home / "services") as started:
        yield {**{n: v for n, v in given.items() if v}, **started}


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    home = (args.home or (Path(tempfile.mkdtemp(prefix="codistill-closed-loop-")) if args.quick
                          else ROOT / "artifacts" / f"closed-loop-{args.size}")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    base = home / "base"
    # a TERM (a killed benchmark) still runs every `finally`: no stage or service left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_all = time.time()
    if args.seed_home and not base.exists():
        console.print(f"copying {args.seed_home} -> {base}")
        copy_home(args.seed_home.resolve(), base)
    prepared_s = None
    if args.no_prepare:
        check_prepared(base)
    else:
        console.print(f"preparing {base} (size {args.size}; log {home / 'logs' / 'prepare.out'})")
        prepared_s = run_cli("prepare", ["stack", "prepare"], base_env(base, args.size),
                             home / "logs", args.prepare_timeout)
    results: dict[str, dict[str, Any]] = {}
    args.private_services = False
    for backend in args.backends:
        t0 = time.time()
        with ExitStack() as stack:  # services only while their backend runs
            services = (stack.enter_context(services_for(args, home))
                        if backend == "kafka-redis" else {})
            results[backend] = run_backend(backend, base, home, args, services, prepared_s)
        results[backend]["run_s"] = round(time.time() - t0, 1)
    payload = {
        "machine": machine(),
        "config": {
            "size": args.size, "impressions": args.impressions, "quick": args.quick,
            "rate": "0 (as fast as the server answers)", "seed": 0,
            "sample_interval_s": args.sample_interval, "drain_timeout_s": args.drain_timeout,
            "commands": {"server": ["codistill", *SERVER], "labeller": ["codistill", *LABELLER],
                         "trainer": ["codistill", *TRAINER],
                         "simulator": ["codistill", "simulate", "--ranker", "server", "--rate", "0",
                                       "--impressions", str(args.impressions)]},
            "settings": {"online.labeller": True, "online.window_s": args.window_s,
                         "online.allowed_lateness_s": args.allowed_lateness_s,
                         "other": "defaults (CODISTILL_* settings of the caller are not passed)"},
            "seed_home": str(args.seed_home) if args.seed_home else None,
            "prepared": "given (--no-prepare)" if args.no_prepare else "codistill stack prepare",
            "base_prepare_s": prepared_s,
        },
        "home": str(home),
        "backends": results,
        "total_s": round(time.time() - t_all, 1),
        "started_at": datetime.fromtimestamp(t_all).astimezone().isoformat(),
    }
    out = args.out or (home / "closed-loop-quick.json" if args.quick else RESULTS / "closed-loop.json")
    path = write_result("closed-loop", payload, out)
    print_table(results, args.impressions, args.size)
    console.print(f"wrote {path}")
    return path


if __name__ == "__main__":
    try:
        main()
    except StageFailed as exc:  # its log tail is printed above; everything is stopped
        console.print(f"[red]closed loop failed:[/red] {exc}")
        sys.exit(1)
