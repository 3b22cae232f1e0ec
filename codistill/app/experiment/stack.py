"""``codistill experiment online --stack``: the KD + feedback arm through the real loop.

The in-process ``distilled/kd+feedback`` arm takes one learner step per ``batch_size``
impressions and ranks the next impression with the weights it has just updated, with
the teacher's view of every online query and candidate at hand. The stack arm
(:data:`STACK_ARM`) is the same student and the same users run the way the stack runs
them, each stage a real process with the stack's command (``scripts/stack.sh
commands``), per seed on a fresh Kafka topic (one partition) and a fresh Redis
namespace holding the teacher's train / valid / test / guard vectors and nothing of
the online split:

* the **server** (``codistill serve``) ranks each visit with its serving bundle,
  falling back to the bundle's candidate tower for candidates the store has no vector
  for yet, and writes the impression and every click (with its propensity) to Kafka;
* the **labeller** (``codistill teacher label --follow``) embeds the queries and
  candidates it sees into Redis;
* the **trainer** (``codistill student online``, warm-started from the same distilled
  student, ``online.labeller`` on) joins clicks to impressions, takes the learner step
  on batches of ``batch_size * (1 + clicks per impression)`` records (the in-process
  arm's impressions per step, on average, for that seed) and publishes a serving bundle
  every ``stack_publish_every`` batches;
* this process promotes each new bundle through the server's admin API (no watcher:
  the gate is not part of the in-process arm either) and scores every impression the
  server answered against the true grades before its clicks are sent, exactly as the
  in-process arms are scored.

So the stack arm sees the same visits and clicks on the same lists; it differs by what
a deployment adds: the labeller's lag (fallback scores, feedback-only rows), the join
window and the publish-and-swap delay. :func:`agreement` says whether its curve stays
within the in-process arm's 95% intervals.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codistill.config import ExperimentSettings, Settings

STACK_ARM = "stack/kd+feedback"
REFERENCE = "distilled/kd+feedback"
START_TIMEOUT_S = 180.0  # for the server, labeller and trainer to become ready
SKIP = frozenset({"cache", "bundles", "experiment-stack"})  # not copied into the run home


@dataclass
class StackSeed:
    """One seed of the stack arm: its scores, what the stages did, and its errors."""

    seed: int
    ndcg: np.ndarray
    rr: np.ndarray
    batch_records: int
    tag: str = ""
    served_by: list[str] = field(default_factory=list)  # the bundle of each impression
    promotions: list[dict[str, Any]] = field(default_factory=list)
    lag: list[dict[str, float]] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    trainer: dict[str, Any] | None = None
    simulator: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        lab = [s["labeller_lag_s"] for s in self.lag if "labeller_lag_s" in s]
        trn = [s["trainer_lag"] for s in self.lag if "trainer_lag" in s]
        served = [p["impressions_sent"] for p in self.promotions]
        return {
            "seed": self.seed, "tag": self.tag, "batch_records": self.batch_records,
            "errors": self.errors, "bundles_served": len(dict.fromkeys(self.served_by)),
            "unscored_impressions": int(np.isnan(self.ndcg).sum()),
            "bundles_promoted": len(self.promotions),
            "impressions_per_bundle": (float(np.mean(np.diff([0, *served])))
                                       if served else None),
            "labeller_lag_s": {"max": max(lab, default=None),
                               "mean": float(np.mean(lab)) if lab else None},
            "trainer_lag_events": {"max": max(trn, default=None),
                                   "mean": float(np.mean(trn)) if trn else None},
            "seconds": round(self.seconds, 1),
            "trainer": self.trainer, "simulator": self.simulator,
        }


def services_of(settings: Settings) -> dict[str, str]:
    """The Redis and Kafka the stack arm uses: ``store.redis_url``, ``stream.bootstrap_servers``."""
    return {"redis": settings.store.redis_url, "kafka": settings.stream.bootstrap_servers}


def check_services(services: dict[str, str]) -> None:
    """A clear error before anything starts when Redis or Kafka does not answer."""
    import socket

    import redis

    try:
        redis.Redis.from_url(services["redis"], socket_timeout=3).ping()
    except (redis.RedisError, OSError) as exc:
        raise ValueError(f"--stack needs Redis at {services['redis']} (store.redis_url): "
                         f"{exc}; start it with `bash scripts/services.sh start redis`") from None
    host, _, port = services["kafka"].split(",")[0].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except (OSError, ValueError) as exc:
        raise ValueError(f"--stack needs Kafka at {services['kafka']} "
                         f"(stream.bootstrap_servers): {exc}; start it with "
                         "`bash scripts/services.sh start kafka`") from None


def seed_settings(settings: Settings, run_home: Path, tag: str,
                  services: dict[str, str]) -> Settings:
    """The run home on Redis namespace ``tag`` and Kafka topic ``tag.events`` (1 partition)."""
    store = settings.store.model_copy(update={"backend": "redis", "redis_url": services["redis"],
                                              "namespace": tag, "path": None})
    stream = settings.stream.model_copy(update={
        "backend": "kafka", "bootstrap_servers": services["kafka"], "topic": f"{tag}.events",
        "dlq_topic": f"{tag}.events.dlq", "partitions": 1, "path": None})
    return settings.model_copy(update={"home": run_home, "embedding_cache": settings.cache_dir,
                                       "store": store, "stream": stream})


def stage_env(s: Settings, tag: str, services: dict[str, str], cfg: ExperimentSettings,
              ports: dict[str, int], api_key: str) -> dict[str, str]:
    """Every stage's environment: the seed's backends, ports and the trainer's objective."""
    from codistill.app.processes import backend_env, base_env

    env = {**base_env(s.home, s.data.size), **backend_env("kafka-redis", services, tag)}
    env.update({
        "CODISTILL_EMBEDDING_CACHE": str(s.cache_dir),
        "CODISTILL_STREAM__PARTITIONS": "1",
        "CODISTILL_SERVING__PORT": str(ports["server"]),
        "CODISTILL_SERVING__ADMIN_API_KEY": api_key,
        "CODISTILL_LABELLER__METRICS_PORT": str(ports["labeller"]),
        "CODISTILL_LABELLER__GROUP": f"{tag}-labeller",
        "CODISTILL_ONLINE__METRICS_PORT": str(ports["trainer"]),
        "CODISTILL_ONLINE__GROUP": f"{tag}-trainer",
        "CODISTILL_ONLINE__LABELLER": "true",
        "CODISTILL_ONLINE__WINDOW_S": str(cfg.stack_window_s),
        "CODISTILL_ONLINE__ALLOWED_LATENESS_S": "0",
        "CODISTILL_ONLINE__TEMPERATURE": str(cfg.temperature),
    })
    return env


def cleanup(services: dict[str, str], tag: str) -> None:
    """Remove namespace ``tag``'s Redis keys and its Kafka topics (the services stay up)."""
    from codistill.app.processes import backend_env, cleanup_shared

    cleanup_shared(backend_env("kafka-redis", services, tag), tag)


def batch_records(run: Any, batch_size: int) -> int:
    """Trainer batch (records: impressions and clicks) with ``batch_size`` impressions on
    average: the in-process reference arm's clicks per impression on this seed."""
    arm = run.arms.get(REFERENCE, {})
    per = arm.get("clicks", 0) / max(arm.get("impressions", 0), 1)
    return max(1, round(batch_size * (1 + per)))


class Promoter(threading.Thread):
    """Promotes each bundle the seed's trainer publishes; samples the stages' lag."""

    def __init__(self, s: Settings, trainer: str, admin: Any, urls: dict[str, str],
                 sent: list[int], seen: set[str]) -> None:
        super().__init__(name="stack-promoter", daemon=True)
        self.s, self.trainer, self.admin, self.urls = s, trainer, admin, urls
        self.sent, self.seen = sent, seen
        self.promotions: list[dict[str, Any]] = []
        self.lag: list[dict[str, float]] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def newest(self) -> str | None:
        from serving.bundle import BundleRegistry

        reg, best = BundleRegistry(self.s.bundles_dir), (-1, None)
        for v in reg.versions():
            if v in self.seen:
                continue
            self.seen.add(v)
            src = reg.load_card(v).source or {}
            if src.get("trainer") == self.trainer and int(src.get("batches", 0)) > best[0]:
                best = (int(src["batches"]), v)
        return best[1]

    def step(self) -> None:
        from codistill.app.processes import scrape, total

        sample: dict[str, float] = {"t": time.time()}
        if (m := scrape(self.urls["labeller"])) is not None:
            sample["labeller_lag_s"] = total(m, "codistill_labeller_lag_seconds")
        if (m := scrape(self.urls["trainer"])) is not None:
            sample["trainer_lag"] = total(m, "codistill_trainer_lag")
        self.lag.append(sample)
        if (version := self.newest()) is not None:
            try:
                self.admin.promote(version)
                self.promotions.append({"bundle": version, "t": time.time(),
                                        "impressions_sent": self.sent[0]})
            except Exception as exc:  # a refused promotion is counted, the run goes on
                self.failures.append(f"{version}: {exc}")

    def run(self) -> None:
        while not self.halt.wait(0.5):
            self.step()


def drain(trainer_metrics: str, window_s: float, expected: int, timeout: float = 60.0) -> bool:
    """Wait (bounded) until the trainer has read the ``expected`` events the users caused
    (its consumed counter: the lag gauge is set per batch, so a stale 0 says nothing about
    events that arrived since), then a partial last batch's wait; False on the timeout."""
    from codistill.app.processes import scrape, total, until

    def read_all() -> bool:
        m = scrape(trainer_metrics)
        return m is not None and total(m, "codistill_trainer_events_consumed_total") >= expected

    done = until(read_all, timeout)
    time.sleep(window_s + 1.0 if done else 0.0)
    return done


def run_stack_seed(settings: Settings, run_home: Path, ctx: Any, cfg: ExperimentSettings,
                   run: Any, services: dict[str, str], initial: str, log: Any) -> StackSeed:
    """The stack arm on seed ``run.seed``'s users (see the module docstring)."""
    from codistill.app.experiment.run import simulator_config
    from codistill.app.processes import App, free_port, wait_ready
    from codistill.app.users import HttpRanker, SimulationSummary, simulate_on_server
    from serving.bundle import BundleRegistry
    from serving.watcher import AdminClient
    from streaming.simulator import gold_rr, ndcg_at
    from teacher import workflow as wf

    t0 = time.monotonic()
    tag = f"exp-{uuid.uuid4().hex[:8]}-s{run.seed}"
    s = seed_settings(settings, run_home, tag, services)
    wf.precompute_version(s, wf.ensure_current(s), wf.precompute_sets(s), progress=False)
    BundleRegistry(s.bundles_dir).set_serving(initial)
    ports = {k: free_port() for k in ("server", "labeller", "trainer")}
    api_key = uuid.uuid4().hex
    env = stage_env(s, tag, services, cfg, ports, api_key)
    n = len(run.first_seen)
    records = batch_records(run, cfg.batch_size)
    logs = run_home / "logs" / tag
    url = f"http://127.0.0.1:{ports['server']}"
    urls = {"labeller": f"http://127.0.0.1:{ports['labeller']}/metrics",
            "trainer": f"http://127.0.0.1:{ports['trainer']}/metrics"}
    apps = [App("server", ["serve"], env, logs),
            App("labeller", ["teacher", "label", "--follow"], env, logs),
            App("trainer", ["student", "online", "--name", tag, "--init-student", "current",
                            "--lr", str(cfg.lr_distilled), "--alpha", str(cfg.alpha),
                            "--batch-size", str(records),
                            "--checkpoint-every", str(cfg.stack_publish_every),
                            "--publish-every", str(cfg.stack_publish_every),
                            "--max-batch-wait-s", str(cfg.stack_window_s)], env, logs)]
    out = StackSeed(run.seed, np.full(n, np.nan), np.full(n, np.nan), records, tag)
    remote = HttpRanker(url, max_candidates=s.serving.max_candidates, depth=cfg.depth)
    sent = [0]
    promoter = Promoter(s, tag, AdminClient(url, api_key), urls, sent,
                        set(BundleRegistry(s.bundles_dir).versions()))
    log(f"stack seed {run.seed}: {tag}, trainer batches of {records} records")
    try:
        for app in apps:
            app.start()
        wait_ready([(apps[0], f"{url}/readyz"), (apps[1], urls["labeller"]),
                    (apps[2], urls["trainer"])], START_TIMEOUT_S)
        promoter.start()

        def shown(i: int, inter: Any) -> None:
            out.ndcg[i] = ndcg_at(inter.shown_grades, inter.visit.grades, 10)
            out.rr[i] = gold_rr(inter.shown_grades, 10)
            out.served_by.append(remote.version)
            sent[0] = i + 1
            for app in apps:
                if not app.alive():
                    raise app.fail("exited while the users were served")

        summary = SimulationSummary("server", url, run.seed)
        simulate_on_server(remote, ctx.examples, simulator_config(cfg, run.seed), n, summary,
                           rate=cfg.stack_rate, on_shown=shown)
        out.errors = summary.errors
        if not drain(urls["trainer"], cfg.stack_window_s, summary.events_written):
            log(f"stack seed {run.seed}: the trainer did not read every event within 60 s")
            out.errors += 1
        out.simulator = {"impressions": summary.impressions, "clicks": summary.clicks,
                         "events_written": summary.events_written,
                         "events_per_s": summary.events_per_s, "seconds": summary.seconds}
    finally:
        promoter.halt.set()
        if promoter.is_alive():
            promoter.join(10)
        for app in apps:
            app.terminate()
        for app in apps:
            app.stop(30)
        cleanup(services, tag)
    trainer = apps[2].stdout_json() or {}
    out.trainer = {k: trainer.get(k) for k in ("batches", "optimizer_steps", "counters")}
    out.promotions, out.lag = promoter.promotions, promoter.lag
    out.errors += len(promoter.failures) + sum(a.rc not in (0, None) for a in apps[1:])
    out.seconds = time.monotonic() - t0
    return out


def run_stack(settings: Settings, ctx: Any, info: dict[str, Any], runs: list[Any],
              log: Any = print) -> dict[str, Any]:
    """The stack arm on every seed of ``runs`` (adds :data:`STACK_ARM` to each run's
    scores); returns the JSON's ``stack`` section (per-seed stages, errors, agreement)."""
    from codistill.app.export import export_bundle
    from codistill.app.processes import copy_home
    from stores import open_configured_store
    from teacher import workflow as wf

    cfg = settings.experiment
    services = services_of(settings)
    check_services(services)
    run_home = settings.home / "experiment-stack"
    copy_home(settings.home, run_home, skip=SKIP)
    tag = f"exp-{uuid.uuid4().hex[:8]}-bundle"
    s = seed_settings(settings, run_home, tag, services)
    wf.precompute_version(s, info["teacher_version"], wf.precompute_sets(s), progress=False)
    try:
        with open_configured_store(s) as store:
            initial = export_bundle(s, store, info["student_version"], log=log).bundle_version
    finally:
        cleanup(services, tag)
    seeds = []
    for run in runs:
        one = run_stack_seed(settings, run_home, ctx, cfg, run, services, initial, log)
        run.ndcg[STACK_ARM], run.rr[STACK_ARM] = one.ndcg, one.rr
        run.arms[STACK_ARM] = one.summary()
        seeds.append(one.summary())
    return {"services": services, "home": str(run_home), "initial_bundle": initial,
            "publish_every": cfg.stack_publish_every, "rate": cfg.stack_rate,
            "window_s": cfg.stack_window_s, "seeds": seeds,
            "errors": sum(x["errors"] for x in seeds),
            "agreement": agreement(runs, cfg.bin)}


def agreement(runs: list[Any], bin_size: int) -> dict[str, Any]:
    """Is the stack arm's curve the in-process arm's, within its 95% intervals?

    Per phase (before / after the switch, all): the stack arm's mean NDCG@10 and the
    reference's interval, and the paired per-seed difference (stack - in-process) with its
    interval; per curve bin: whether the stack's mean lies in the reference's band.
    ``holds``: every phase mean inside the reference's interval.
    """
    from codistill.app.experiment import report

    table = report.phase_table(runs)
    phases = {}
    for phase in ("before", "after", "all"):
        ref, got = table[REFERENCE][f"ndcg_{phase}"], table[STACK_ARM][f"ndcg_{phase}"]
        diffs = [float(np.nanmean(r.ndcg[STACK_ARM][m]) - np.nanmean(r.ndcg[REFERENCE][m]))
                 for r in runs if (m := report.phases(r)[phase]).any()]
        inside = (None if ref["low"] is None or got["mean"] is None
                  else ref["low"] <= got["mean"] <= ref["high"])
        phases[phase] = {"stack": got, "in_process": ref, "inside": inside,
                         "difference": report.interval(diffs)}
    c = report.curves(runs, bin_size, "ndcg")["arms"]
    bins = [lo is not None and lo <= m <= hi for m, lo, hi in zip(
        c[STACK_ARM]["mean"], c[REFERENCE]["low"], c[REFERENCE]["high"], strict=True)
        if m is not None]
    verdicts = [p["inside"] for p in phases.values()]
    return {"phases": phases, "bins_inside": int(sum(bins)), "bins": len(bins),
            "holds": None if None in verdicts else all(verdicts)}
