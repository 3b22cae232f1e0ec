"""The online trainer's I/O around the learner: what makes each step happen exactly once.

:class:`~student.online.learner.OnlineLearner` steps on a joined batch; :class:`OnlineTrainer`
is the rest: one writer per name, the leased version, the offset schedule, reading,
validating, joining, fetches with retries, checkpoint-then-commit, metrics, drift,
signals, the crash hook, the export. Why it is exactly-once: :mod:`student.online`.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codistill.config import OnlineTrainerConfig, Settings
from stores import open_store
from stores.base import Store
from streaming import open_stream
from streaming.base import EventStream, Record
from streaming.dlq import DeadLetterQueue
from streaming.join import JoinedImpression, Joiner
from student.asym import MissingCandidateError
from student.base import Student
from student.online.batching import CachingTokenizer
from student.online.bootstrap import (
    TrainerError,
    candidate_source,
    export_student,
    new_student,
    resolve_version,
    vocabulary_seq,
)
from student.online.checkpoint import FLUSH_PARTITION, CheckpointManager, Key, TrainerState
from student.online.faults import BackoffRetry, CrashHook, Interrupted, stop_on_signals
from student.online.keeper import VersionKeeper
from student.online.learner import JoinedBatch, LearnStats, OnlineLearner
from student.online.loop import run_loop
from student.online.plan import PLAN_SUFFIX, PlanEntry, PlanLog, advance_watermark
from student.online.reader import read_range, validate_records
from student.online.resume import check_config, check_resume_point, first_segment, restore
from student.online.retention import begin_partitions
from student.online.telemetry import DriftMonitor, TrainerMetrics

log = logging.getLogger("codistill.trainer")

# called after every checkpoint and once at the end: (checkpoint dir, progress info)
CheckpointHook = Callable[[Path, dict[str, Any]], None]


class OnlineTrainer:
    """The single writer of one online student (see :mod:`student.online`).

    Parameters
    ----------
    settings
        Where the store, the stream and ``HOME`` are.
    cfg
        The trainer's config; default ``settings.online``.
    store, stream
        Already open backends to use (and leave open); default: open the configured ones.
    on_checkpoint
        Called after every checkpoint (once committed) and at the end; how the app
        publishes serving bundles without the student layer knowing about serving.

    Examples
    --------
    ``with OnlineTrainer(settings) as trainer: summary = trainer.run()``
    """

    def __init__(self, settings: Settings, cfg: OnlineTrainerConfig | None = None,
                 store: Store | None = None, stream: EventStream | None = None,
                 on_checkpoint: CheckpointHook | None = None) -> None:
        self.settings = settings
        self.on_checkpoint = on_checkpoint
        self.cfg = cfg = cfg if cfg is not None else settings.online
        stream_settings = settings.resolved_stream()
        self.topic, self.dlq_topic = stream_settings.topic, stream_settings.dlq_topic
        self.group = cfg.group or f"codistill-trainer-{cfg.name}"
        self.consumer = f"trainer:{cfg.name}"
        self._own_store, self._own_stream = store is None, stream is None
        self.store: Store = store if store is not None else open_store(settings.resolved_store())
        self.stream: EventStream = stream if stream is not None else open_stream(stream_settings)
        base = settings.home / "online" / cfg.name
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir or base / "checkpoints",
                                             cfg.keep_checkpoints)
        self.output_dir = cfg.output_dir or base / "student"
        root = self.checkpoints.root  # the plan lies beside the checkpoints, not inside
        self.plan = PlanLog(root.parent / f"{root.name}{PLAN_SUFFIX}")
        self.metrics = TrainerMetrics()
        self.dlq = DeadLetterQueue(self.stream, self.dlq_topic, self.metrics.registry)
        self.counters: dict[str, float] = {}
        self._retry = BackoffRetry(cfg.backoff, self._count, self.metrics, lambda: self._stop)
        self.keeper = VersionKeeper(self.store, self.consumer, cfg.lease_ttl_s, self._retry)
        self._retry.on_recovered = self.keeper.on_recovered  # a store back from an outage
        self._crash_hook = CrashHook()
        self._stop = False
        self._ends: dict[int, int] = {}
        self._run_batches = 0
        self._run_events = 0
        self._last_ckpt = -1
        self.phase_seconds: defaultdict[str, float] = defaultdict(float)
        self.loop_seconds = 0.0
        self.resumed_from: str | None = None
        self._lock: Any = None
        self.last_checkpoint: Path | None = None
        self.version = ""
        self.partitions: list[int] = []
        self.learner: OnlineLearner

    @property
    def student(self) -> Student:
        """The model being trained (the learner's), once ``run`` has set it up."""
        return self.learner.student

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The learner's optimizer."""
        return self.learner.optimizer

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train until the input ends (``until_end``), ``max_batches`` or SIGTERM/SIGINT.

        Returns
        -------
        dict
            The run's summary (see :meth:`summary`).
        """
        started = time.monotonic()
        restore = stop_on_signals(self.request_stop)
        threads = torch.get_num_threads()
        deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
        interrupted = False
        try:
            self._setup()
            loop_start = time.perf_counter()
            try:
                self._loop()
            except Interrupted:
                interrupted = True  # mid-batch: the in-memory state is not a consistent cut
                log.warning("stopped during an outage; resuming will redo the batches "
                            "after checkpoint %s", self._last_ckpt)
            if not interrupted and self.state.batches != self._last_ckpt:
                self._checkpoint()
            self.loop_seconds = time.perf_counter() - loop_start
            if not interrupted:
                self._export_student()
                self._notify(final=True)
            return self.summary(time.monotonic() - started, interrupted)
        finally:
            self.keeper.release()  # a clean exit; a killed trainer's lease runs out instead
            restore()
            torch.set_num_threads(threads)  # process-wide settings: leave them as found
            if deterministic != (torch.are_deterministic_algorithms_enabled(),
                                 torch.is_deterministic_algorithms_warn_only_enabled()):
                torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])

    def close(self) -> None:
        """Stop the metrics server, release the lock, close what the trainer opened."""
        self.metrics.close()
        if self._lock is not None:
            self.checkpoints.unlock(self._lock)
            self._lock = None
        if self._own_stream:
            self.stream.close()
        else:
            self.stream.flush()
        if self._own_store:
            self.store.close()

    def __enter__(self) -> OnlineTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_stop(self) -> None:
        """Finish the current batch, checkpoint, commit and return from ``run`` (thread-safe)."""
        self._stop = True

    # -- setup -----------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        threads = cfg.threads or self.settings.threads
        if threads:
            torch.set_num_threads(threads)
        if cfg.deterministic and not torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(True, warn_only=True)
        self._take_lock()
        self.checkpoints.cleanup()
        ckpt = self.checkpoints.load()
        self.version = resolve_version(self.store, cfg, self._retry,
                                       ckpt.state.teacher_version if ckpt else None)
        counts = self.keeper.take(self.version, ckpt.state.store_counts if ckpt else {})
        self.joiner: Joiner
        if ckpt is not None:
            segment = check_config(ckpt, cfg, self.topic)
            student = Student.load(
                ckpt.path, expected_teacher_version=self.version,
                candidate_source=candidate_source(self.store, self.version, self._retry))
            self.learner, self.joiner, self.drift = restore(ckpt, student, cfg, segment)
            self.state = st = ckpt.state
            self.counters = dict(st.counters)
            self._last_ckpt = st.batches
            self.resumed_from = ckpt.path.name
            log.info("resuming from %s: %d batches applied, offsets %s", ckpt.path, st.batches,
                     st.offsets)
        else:
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
            student = new_student(self.store, self.settings, cfg, self.version, self._retry,
                                  vocabulary_seq(cfg, self.plan, self.keeper))
            self.learner = OnlineLearner.from_config(student, cfg)
            self.state = TrainerState(cfg.name, self.version, self.topic, cfg.batch_size,
                                      store_counts=counts, segments=[first_segment(cfg)])
            self.joiner = Joiner(cfg.window_s, cfg.allowed_lateness_s)
            self.drift = DriftMonitor(cfg.drift_delta, window=cfg.drift_window)
        if cfg.token_cache:
            student.tokenizer = CachingTokenizer(student.tokenizer, cfg.token_cache)
        self.partitions = sorted(self._retry("stream", "partitions",
                                             lambda: self.stream.partitions(self.topic)))
        if begin_partitions(self.state, self.stream, self.topic, self.partitions, cfg,
                            self._retry, fresh=ckpt is None, count=self._count):
            self.plan.discard(self.state.batches)  # recorded past a gap: records are gone
        if ckpt is not None:
            check_resume_point(self.state, self.stream, self.group, self.topic, self.partitions,
                               self._retry)
            self._commit()  # a crash between checkpoint and commit left the group behind
        self.metrics.info.labels(name=cfg.name, teacher_version=self.version).set(1)
        self.metrics.last_checkpoint.set(max(self._last_ckpt, 0))
        self.metrics.serve(cfg.metrics_port, cfg.metrics_host)

    def _take_lock(self) -> None:
        """One writer per checkpoint directory: a second trainer of the same name refuses."""
        if self._lock is None:
            self._lock = self.checkpoints.try_lock()
            if self._lock is None:
                raise TrainerError(f"another trainer holds {self.checkpoints.root}: trainer "
                                   f"{self.cfg.name!r} is already running")

    # -- the loop --------------------------------------------------------------------------
    def _done(self) -> bool:
        limit = self.cfg.max_batches
        return self._stop or (limit is not None and self._run_batches >= limit)

    def _loop(self) -> None:
        """Apply the plan's units, waiting for data (:mod:`student.online.loop`)."""
        run_loop(self)

    def _end(self, p: int) -> int:
        end = self._retry("stream", "end offset", lambda: self.stream.end_offset(self.topic, p))
        self._ends[p] = end
        self.metrics.lag.labels(partition=str(p)).set(end - self.state.offsets.get(p, 0))
        return end

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        """Accumulate wall time per phase (the benchmark's breakdown)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] += time.perf_counter() - t0

    def _read(self, p: int, start: int, end: int) -> list[Record]:
        with self._timed("read"):
            return read_range(self.stream, self.topic, p, start, end, self._retry,
                              lambda: self._stop)

    # -- one batch -------------------------------------------------------------------------
    def _apply(self, entry: PlanEntry, records: list[Record] | None) -> None:
        """Apply one plan entry (an offset batch, or the final flush) and maybe checkpoint."""
        key: Key = (self.topic, entry.partition, entry.start, entry.end)
        self.state.ledger.check(key)
        seq = entry.store_seq
        if records is None:
            ready = self.joiner.flush()
        else:
            with self._timed("validate"):
                valid = validate_records(records, self.store, self.version, self.dlq,
                                         self._retry, self._count, max_seq=seq,
                                         pending=entry.pending)
            with self._timed("join"):
                for rec, event in valid:
                    self.joiner.add(event, rec.partition)
                for q, watermark in sorted(entry.advance.items()):  # idle partitions
                    advance_watermark(self.joiner, q, watermark)
                ready = self.joiner.pop_ready()
        self._train(ready, seq)
        # the unit is applied: advance the in-memory state as one step
        _, p, _, end = key
        self.state.ledger.record(key)
        self.state.batches += 1
        self.state.turn = entry.next_turn
        if p == FLUSH_PARTITION:
            self.state.flushed = True
        else:
            self.state.offsets[p] = end
            self.metrics.lag.labels(partition=str(p)).set(self._ends.get(p, end) - end)
        n = len(records or [])
        self._count("events_consumed", n)
        self._run_events += n
        self._run_batches += 1
        self.metrics.consumed(n)
        self.metrics.batches.inc()
        self._crash("after_step")
        if self.state.batches % self.cfg.checkpoint_every == 0:
            self._checkpoint()

    def _train(self, ready: list[JoinedImpression], seq: int | None = None) -> None:
        """Fetch what ``ready`` needs (one batched call each), step, record the stats."""
        self._count("impressions_joined", len(ready))
        self.metrics.impressions.inc(len(ready))
        if not ready:
            self._count("empty_batches")
            return
        with self._timed("fetch"):
            batch = JoinedBatch.fetch(
                ready,
                lambda qids: self._retry("store", "get_labels",
                                         lambda: self.store.get_labels(self.version, qids,
                                                                         max_seq=seq)),
                lambda cids: self._retry("store", "get_texts",
                                         lambda: self.store.get_texts(cids)),
                None if self.student.has_candidate_tower else  # scored by stored vectors
                lambda cids: self._retry("store", "has_embeddings",
                                         lambda: self.store.has_embeddings(
                                             self.version, cids, max_seq=seq)),
                lambda cids: self._retry("store", "get_embeddings",  # one label per query
                                         lambda: self.store.get_embeddings(
                                             self.version, cids, max_seq=seq)))
        if missing := batch.missing_vectors():  # validated when read, gone since
            log.warning("batch %d: %d candidates have no vector for teacher %s in %s "
                        "(dropped from their rows, counted as embedding_misses): %s",
                        self.state.batches + 1, len(missing), self.version,
                        self.store.describe(), ", ".join(missing[:5]))
        with self._timed("step"):
            try:
                stats = self.learner.learn_many(batch)
            except MissingCandidateError as exc:  # deleted between the check and the read
                raise TrainerError(f"batch {self.state.batches + 1} of trainer "
                                   f"{self.cfg.name!r}: {exc.args[0] if exc.args else exc}") from exc
            self._record(stats)

    def _record(self, stats: LearnStats) -> None:
        """Counters, metrics and drift detectors of one ``learn_many``."""
        s = stats.batch
        for name in ("label_hits", "label_misses", "label_misaligned", "label_extended",
                     "text_misses", "clicks"):
            self._count(name, getattr(s, name))
        self._count("skipped_impressions", s.skipped)
        self._count("embedding_misses", stats.embedding_misses)
        self._count("rows", s.rows)
        self.metrics.label_hits.inc(s.label_hits)
        self.metrics.label_misses.inc(s.label_misses + s.label_misaligned)
        if not stats.stepped:
            self._count("empty_batches")  # no row, or a zero gradient: no step
            return
        assert stats.loss is not None and stats.kd is not None and stats.feedback is not None
        self.state.optimizer_steps += 1
        self.metrics.steps.inc()
        loss = stats.loss
        self.counters.update(loss_last=loss, kd_last=stats.kd, feedback_last=stats.feedback)
        self.metrics.loss.labels(part="total").set(loss)
        self.metrics.loss.labels(part="kd").set(stats.kd)
        self.metrics.loss.labels(part="feedback").set(stats.feedback)
        self._observe("loss", loss)
        if stats.agreement is not None:
            self.counters["agreement_last"] = stats.agreement
            self.metrics.agreement.set(stats.agreement)
            self._observe("agreement", stats.agreement)

    def _observe(self, signal_name: str, value: float) -> None:
        if self.metrics.observe_drift(self.drift, signal_name, value, self.state.batches):
            self._count(f"drift_events_{signal_name}")

    # -- checkpoint + commit ---------------------------------------------------------------
    def _checkpoint(self) -> None:
        t0 = time.perf_counter()
        # nothing is saved or committed on top of a store that lost the version (StoreLost)
        self.state.store_counts = self.keeper.check(f"before checkpoint {self.state.batches}")
        self._retry("stream", "flush", self.stream.flush)  # dead letters of these batches
        self.state.joiner = self.joiner.state()
        self.state.counters = dict(self.counters)
        for reason, value in self.joiner.counters.items():
            self.metrics.join_dropped.labels(reason=reason).set(value)
        self.last_checkpoint = self.checkpoints.save(
            self.student, self.optimizer, self.state, self.drift.to_json(),
            before_switch=lambda: self._crash("before_latest"),
        )
        self._last_ckpt = self.state.batches
        self.keeper.recorded = dict(self.state.store_counts)
        self._crash("after_checkpoint")
        self._commit()
        seconds = time.perf_counter() - t0
        self.metrics.checkpoint_seconds.observe(seconds)
        self.phase_seconds["checkpoint"] += seconds
        self.metrics.last_checkpoint.set(self.state.batches)
        self._notify(final=False)

    def _notify(self, final: bool) -> None:
        """Tell ``on_checkpoint`` (e.g. the bundle publisher) about the newest checkpoint."""
        if self.on_checkpoint is not None and self.last_checkpoint is not None:
            self.on_checkpoint(self.last_checkpoint, {
                "trainer": self.cfg.name, "batches": self.state.batches, "final": final,
                "teacher_version": self.version})

    def _commit(self) -> None:
        offsets = dict(self.state.offsets)
        self._retry("stream", "commit", lambda: self.stream.commit(self.group, self.topic, offsets))

    def _export_student(self) -> None:
        """Replace ``output_dir`` with the final student (a normal loadable student dir)."""
        export_student(self.student, self.output_dir, {
            "name": self.cfg.name, "teacher_version": self.version, "batches": self.state.batches,
            "offsets": {str(p): o for p, o in self.state.offsets.items()},
            "checkpoint": None if self.last_checkpoint is None else self.last_checkpoint.name,
        })

    # -- helpers ---------------------------------------------------------------------------
    def _count(self, name: str, n: float = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _crash(self, point: str) -> None:
        self._crash_hook(point, self.state.batches)

    def summary(self, seconds: float, interrupted: bool = False) -> dict[str, Any]:
        """The run's summary: progress, counters, drift state, paths and timings.

        Parameters
        ----------
        seconds
            Wall time of the run.
        interrupted
            True when the run stopped mid-batch (no final checkpoint, no export).

        Returns
        -------
        dict
            JSON-ready (``python -m student.online`` prints it).
        """
        c = self.counters
        return {
            "name": self.cfg.name,
            "teacher_version": self.version,
            "group": self.group,
            "topic": self.topic,
            "resumed_from": self.resumed_from,
            "interrupted": interrupted,
            "batches": self.state.batches,
            "batches_this_run": self._run_batches,
            "optimizer_steps": self.state.optimizer_steps,
            "offsets": {str(p): o for p, o in sorted(self.state.offsets.items())},
            "ledger_batches": self.state.ledger.count,
            "flushed": self.state.flushed,
            "counters": {k: c[k] for k in sorted(c)},
            "joiner": dict(self.joiner.counters),
            "drift": self.drift.state(self.state.batches),
            "checkpoint": None if self.last_checkpoint is None else str(self.last_checkpoint),
            "student_dir": None if interrupted else str(self.output_dir),
            "seconds": round(seconds, 3),
            "loop_seconds": round(self.loop_seconds, 3),
            "phase_seconds": {k: round(v, 3) for k, v in sorted(self.phase_seconds.items())},
            "events_this_run": self._run_events,
            "events_per_s": (round(self._run_events / self.loop_seconds, 1)
                             if self.loop_seconds > 0 else 0.0),
        }


def run_online(settings: Settings, cfg: OnlineTrainerConfig | None = None,
               on_checkpoint: CheckpointHook | None = None) -> dict[str, Any]:
    """Open the configured store and stream, run one trainer, close everything.

    Parameters
    ----------
    settings
        The settings (store, stream, ``HOME``).
    cfg
        The trainer config; default ``settings.online``.
    on_checkpoint
        Called after each checkpoint and at the end (the app's bundle publisher).

    Returns
    -------
    dict
        The trainer's summary.
    """
    with OnlineTrainer(settings, cfg if cfg is not None else settings.online,
                       on_checkpoint=on_checkpoint) as trainer:
        return trainer.run()
