"""The online trainer (``codistill student online``): exactly-once distillation from a stream.

One trainer process is the single writer of its student. It pins the teacher
version it distils from, then repeats, forever or until the input ends:

1. **Deterministic batch.** Batch ``k`` of partition ``p`` is offsets
   ``[kB, (k+1)B)``; partitions take turns in sorted order and a batch is taken
   only when it is complete (``strict_order``: the turn waits for it), so the
   same log always yields the same sequence of updates. ``until_end`` (tests,
   demo: the producer is known to be finished) also applies each partition's
   final partial batch and then flushes the joiner.
2. **Validate and join.** Bad records go to the dead-letter topic with their
   reason (never a crash); valid events feed the per-partition event-time Joiner.
3. **One step.** Soft labels of the ready impressions' queries are fetched in one
   batched call, candidate texts in another; ``OnlineLoss`` mixes listwise KD
   with IPW click feedback; queries without labels train on feedback only. An
   unreachable store is retried with capped exponential backoff - the *same*
   batch, never skipped. All store reads of a batch happen before its side
   effects, so a retry never sends a dead letter twice.
4. **Checkpoint, then commit.** Every ``checkpoint_every`` batches the model,
   optimizer, offsets, joiner, RNG, counters and the ledger of applied batches
   are written atomically (:mod:`student.checkpoint`); only then are the offsets
   committed to the consumer group. On restart the checkpoint - not the group -
   says where to resume, and the ledger refuses to apply any offset twice.

Why this is exactly-once: the model state and the offsets that produced it are
saved in one atomic step, so after a crash anywhere the trainer resumes from a
state whose offsets match its weights; the batches after that checkpoint are
replayed from the same offsets with the same joiner and RNG state and therefore
recompute the same updates. Dead letters are at-least-once (keyed by source
position, so readers can drop repeats); Prometheus counters restart at zero.

Test hook: ``CODISTILL_TRAINER_CRASH_AT="after_step:5,after_checkpoint:9"`` makes
the process SIGKILL itself at those points when its batch count reaches those
numbers (``before_latest`` = checkpoint renamed, LATEST not yet switched).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from codistill.config import OnlineTrainerConfig, Settings, load_settings
from stores import StoreUnavailable, open_store
from stores.base import Store
from streaming import StreamError, StreamUnavailable, open_stream
from streaming.base import EventStream, Record
from streaming.dlq import DeadLetterQueue, Rejection, validate
from streaming.events import Event, Impression
from streaming.join import JoinedImpression, Joiner
from student.asym import StoreCandidates
from student.base import Student
from student.batching import CachingTokenizer, build_batch, needed_ids, top1_agreement
from student.bow import BowConfig, BowStudent
from student.checkpoint import (
    FLUSH_PARTITION,
    CheckpointManager,
    Key,
    LedgerViolation,
    TrainerState,
    restore_rng,
)
from student.losses import IPWClickLoss, ListwiseKDLoss, OnlineLoss
from student.telemetry import DriftMonitor, TrainerMetrics
from student.tokenizer import SubwordTokenizer

log = logging.getLogger("codistill.trainer")

CRASH_ENV = "CODISTILL_TRAINER_CRASH_AT"
CRASH_POINTS = ("after_step", "before_latest", "after_checkpoint")
T = TypeVar("T")


class TrainerError(RuntimeError):
    """The trainer cannot start or continue (bad version, mismatched checkpoint, ...)."""


class _Interrupted(Exception):
    """Stop requested while a batch was half done: exit without checkpointing it."""


def _parse_crash_env() -> set[tuple[str, int]]:
    spec = os.environ.get(CRASH_ENV, "").strip()
    points: set[tuple[str, int]] = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, batch = item.partition(":")
        if point not in CRASH_POINTS or not batch.isdigit():
            raise ValueError(f"{CRASH_ENV}: bad item {item!r} (want POINT:BATCH, POINT in "
                             f"{CRASH_POINTS})")
        points.add((point, int(batch)))
    return points


class OnlineTrainer:
    """The trainer; see the module docstring. ``run()`` returns a summary dict."""

    def __init__(self, settings: Settings, cfg: OnlineTrainerConfig | None = None,
                 store: Store | None = None, stream: EventStream | None = None) -> None:
        self.settings = settings
        self.cfg = cfg = cfg or OnlineTrainerConfig()
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
        self.metrics = TrainerMetrics()
        self.dlq = DeadLetterQueue(self.stream, self.dlq_topic, self.metrics.registry)
        self.counters: dict[str, float] = {}
        self._crash_at = _parse_crash_env()
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

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train until the input ends (``until_end``), ``max_batches`` or SIGTERM/SIGINT."""
        started = time.monotonic()
        restore = self._install_signals()
        threads = torch.get_num_threads()
        deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
        interrupted = False
        try:
            self._setup()
            loop_start = time.perf_counter()
            try:
                self._loop()
            except _Interrupted:
                interrupted = True  # mid-batch: the in-memory state is not a consistent cut
                log.warning("stopped during an outage; resuming will redo the batches "
                            "after checkpoint %s", self._last_ckpt)
            if not interrupted and self.state.batches != self._last_ckpt:
                self._checkpoint()
            self.loop_seconds = time.perf_counter() - loop_start
            if not interrupted:
                self._export_student()
            return self.summary(time.monotonic() - started, interrupted)
        finally:
            restore()
            torch.set_num_threads(threads)  # process-wide settings: leave them as found
            if deterministic != (torch.are_deterministic_algorithms_enabled(),
                                 torch.is_deterministic_algorithms_warn_only_enabled()):
                torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])

    def close(self) -> None:
        self.metrics.close()
        if self._lock is not None:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
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

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, lambda *_: self.request_stop())

        def restore() -> None:
            for s, handler in old.items():
                signal.signal(s, handler)

        return restore

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
        self.version = self._resolve_version(ckpt.state.teacher_version if ckpt else None)
        self._retry("store", "pin", lambda: self.store.pin(self.version, self.consumer))
        self.joiner: Joiner
        if ckpt is not None:
            st = ckpt.state
            if st.topic != self.topic or st.batch_size != cfg.batch_size:
                raise TrainerError(
                    f"checkpoint {ckpt.path} was written for topic {st.topic!r} with batch_size "
                    f"{st.batch_size}; this run has {self.topic!r} / {cfg.batch_size}: batch "
                    "boundaries would move. Use another trainer name to start afresh."
                )
            self.student = Student.load(ckpt.path, expected_teacher_version=self.version,
                                        candidate_source=self._candidate_source())
            self.optimizer = self._make_optimizer()
            self.optimizer.load_state_dict(ckpt.optimizer_state)
            restore_rng(st, ckpt.rng)
            self.state = st
            self.joiner = Joiner.from_state(st.joiner)
            self.drift = (DriftMonitor.loads(ckpt.drift) if ckpt.drift is not None
                          else DriftMonitor(cfg.drift_delta))
            self.counters = dict(st.counters)
            self._last_ckpt = st.batches
            self.resumed_from = ckpt.path.name
            log.info("resuming from %s: %d batches applied, offsets %s", ckpt.path, st.batches,
                     st.offsets)
        else:
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
            self.student = self._new_student()
            self.optimizer = self._make_optimizer()
            self.state = TrainerState(cfg.name, self.version, self.topic, cfg.batch_size)
            self.joiner = Joiner(cfg.window_s, cfg.allowed_lateness_s)
            self.drift = DriftMonitor(cfg.drift_delta)
        if cfg.token_cache:
            self.student.tokenizer = CachingTokenizer(self.student.tokenizer, cfg.token_cache)
        self.loss = OnlineLoss(cfg.alpha, ListwiseKDLoss(cfg.temperature),
                               IPWClickLoss(cfg.eta, cfg.max_ipw_weight))
        self.partitions = sorted(self._retry("stream", "partitions",
                                             lambda: self.stream.partitions(self.topic)))
        for p in self.partitions:
            self.state.offsets.setdefault(p, 0)
        if ckpt is not None:
            self._check_resume_point()
            self._commit()  # a crash between checkpoint and commit left the group behind
        self.metrics.info.labels(name=cfg.name, teacher_version=self.version).set(1)
        self.metrics.last_checkpoint.set(max(self._last_ckpt, 0))
        self.metrics.serve(cfg.metrics_port)

    def _take_lock(self) -> None:
        """One writer per checkpoint directory: a second trainer of the same name refuses to
        start (the OS drops the lock when the holder dies, SIGKILL included)."""
        if self._lock is not None:
            return
        lock = open(self.checkpoints.root / ".lock", "a+b")  # noqa: SIM115 - held until close
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise TrainerError(f"another trainer holds {self.checkpoints.root}: trainer "
                               f"{self.cfg.name!r} is already running") from None
        self._lock = lock

    def _check_resume_point(self) -> None:
        """The checkpoint's offsets must be exactly what its ledger says was applied.

        Batches are contiguous from offset 0, so partition ``p`` resumes at ``next`` only if
        the ledger covers ``[0, next)`` and nothing beyond; anything else means the offsets
        and the weights come from different histories.
        """
        ledger = self.state.ledger
        for p in self.partitions:
            nxt = self.state.offsets[p]
            spans = ledger.intervals.get((self.topic, p), [])
            if spans != ([[0, nxt]] if nxt else []):
                raise LedgerViolation(
                    f"checkpoint resumes {self.topic}[{p}] at offset {nxt} but its ledger "
                    f"applied {spans}: offsets and weights disagree, refusing to train"
                )
            group = self._retry("stream", "committed",
                                lambda p=p: self.stream.committed(self.group, self.topic, p))
            if group is not None and group > nxt:
                log.warning("group %s committed %s[%d] up to %d, past the checkpoint's %d: "
                            "another consumer uses this group? Resuming from the checkpoint",
                            self.group, self.topic, p, group, nxt)

    def _resolve_version(self, from_checkpoint: str | None) -> str:
        requested = self.cfg.teacher_version
        if from_checkpoint is not None:
            if requested and requested != from_checkpoint:
                raise TrainerError(
                    f"the checkpoints of trainer {self.cfg.name!r} distil from {from_checkpoint!r}, "
                    f"not {requested!r}; use another trainer name to switch teacher"
                )
            version = from_checkpoint
        else:
            version = requested or self._retry("store", "current", self.store.current)
            if version is None:
                raise TrainerError(f"{self.store.describe()} has no current teacher version: "
                                   "precompute one first (codistill teacher precompute)")
        info = self._retry("store", "get_version", lambda: self.store.get_version(version))
        if info is None:
            raise TrainerError(f"teacher version {version!r} is unknown to {self.store.describe()}")
        if info.status != "complete":
            raise TrainerError(f"teacher version {version!r} is {info.status!r}, not complete: "
                               "refusing to distil from a half-written version")
        return version

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.parameters(), lr=self.cfg.lr,
                                 weight_decay=self.cfg.weight_decay, foreach=False)

    def _new_student(self) -> Student:
        cfg = self.cfg
        if cfg.init_student is not None:
            student = Student.load(cfg.init_student, candidate_source=self._candidate_source())
            if student.teacher_version != self.version and not student.has_candidate_tower:
                raise TrainerError(
                    f"warm start {cfg.init_student} scores against the candidate embeddings of "
                    f"teacher {student.teacher_version}; this trainer distils from "
                    f"{self.version}, whose vectors live in another space. Distil a new "
                    "student from that version first.")
            if student.teacher_version != self.version:
                log.warning("warm start %s was built on teacher %s; it now distils from %s",
                            cfg.init_student, student.teacher_version, self.version)
                student.teacher_version = self.version
            return student
        texts = self._vocabulary_texts()
        tokenizer = SubwordTokenizer(cfg.max_vocab, cfg.oov_buckets).fit(texts)
        torch.manual_seed(cfg.seed)
        return BowStudent(tokenizer, self.version, BowConfig(dim=cfg.dim, out_dim=cfg.out_dim),
                          query_max_len=cfg.query_max_len,
                          candidate_max_len=cfg.candidate_max_len)

    def _candidate_source(self) -> StoreCandidates:
        """Teacher vectors of the pinned version for query-only students, read with retry."""
        return StoreCandidates(self.store, self.version,
                               call=lambda fn: self._retry("store", "candidate embeddings", fn))

    def _vocabulary_texts(self) -> list[str]:
        """Candidate texts of the pinned version (+ train-split queries when available)."""
        ids = self._retry("store", "candidate ids",
                          lambda: sorted(self.store.iter_candidate_ids(self.version)))
        texts: list[str] = []
        for i in range(0, len(ids), 4096):
            chunk = ids[i : i + 4096]
            texts += [t for t in self._retry("store", "texts", lambda c=chunk:
                                             self.store.get_texts(c)) if t]
        train = self.settings.data_dir / "train.jsonl"
        if self.cfg.vocab_from_data and train.exists():
            from codistill.ranking import read_ranking_file

            texts += [ex.query for ex in read_ranking_file(train)]
        if not texts:
            raise TrainerError(f"no candidate texts for {self.version!r}: cannot fit a vocabulary")
        return texts

    # -- the loop --------------------------------------------------------------------------
    def _done(self) -> bool:
        limit = self.cfg.max_batches
        return self._stop or (limit is not None and self._run_batches >= limit)

    def _loop(self) -> None:
        cfg, parts, n = self.cfg, self.partitions, len(self.partitions)
        size, offsets = cfg.batch_size, self.state.offsets
        targets: dict[int, int] | None = None
        if cfg.until_end:
            targets = {p: self._end(p) for p in parts}
        idle, waiting = 0, False
        while not self._done():
            if targets is not None and all(targets[p] - offsets[p] < size for p in parts):
                break
            p = parts[self.state.turn % n]
            start = offsets[p]
            next_turn = (self.state.turn + 1) % n
            if targets is not None and targets[p] - start < size:
                self.state.turn = next_turn  # retired: its remaining records are a partial batch
                continue
            if self._ends.get(p, 0) < start + size and self._end(p) < start + size:
                if not waiting:
                    log.info("waiting for a full batch on %s[%d] at offset %d", self.topic, p,
                             start)
                    waiting = True
                if cfg.strict_order:
                    time.sleep(cfg.poll_interval_s)
                else:
                    self.state.turn, idle = next_turn, idle + 1
                    if idle >= n:
                        time.sleep(cfg.poll_interval_s)
                        idle = 0
                continue
            idle, waiting = 0, False
            records = self._read(p, start, start + size)
            self._apply((self.topic, p, start, start + size), records, next_turn)
        if targets is None or self._done():
            return
        for p in parts:  # the producer is finished: apply what is left, in partition order
            if self._done():
                return
            if offsets[p] < targets[p]:
                self._apply((self.topic, p, offsets[p], targets[p]),
                            self._read(p, offsets[p], targets[p]), self.state.turn)
        if cfg.flush_at_end and not self.state.flushed and not self._done():
            total = sum(offsets.values())
            self._apply((self.topic, FLUSH_PARTITION, total, total + 1), None, self.state.turn)

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
            return self._read_range(p, start, end)

    def _read_range(self, p: int, start: int, end: int) -> list[Record]:
        """Exactly the records ``[start, end)`` of partition ``p`` (they are known to exist)."""
        out: list[Record] = []
        empty = 0
        while start + len(out) < end:
            at = start + len(out)
            got = self._retry("stream", "read",
                              lambda at=at: self.stream.read(self.topic, p, at, end - at))
            if not got:
                empty += 1
                if empty > 100:
                    raise StreamError(f"{self.topic}[{p}]: offsets [{at}, {end}) below the end "
                                      "offset could not be read")
                if self._stop:
                    raise _Interrupted
                time.sleep(min(0.01 * empty, 0.5))
                continue
            for i, rec in enumerate(got):
                if rec.offset != at + i:
                    raise StreamError(f"{self.topic}[{p}]: expected offset {at + i}, got "
                                      f"{rec.offset} (compacted or transactional topics are "
                                      "not supported)")
            out += got[: end - at]
        return out

    # -- one batch -------------------------------------------------------------------------
    def _apply(self, key: Key, records: list[Record] | None, next_turn: int) -> None:
        """Apply one unit (an offset batch, or the final flush) and maybe checkpoint."""
        self.state.ledger.check(key)
        if records is None:
            ready = self.joiner.flush()
        else:
            with self._timed("validate"):
                valid = self._validate(records)
            with self._timed("join"):
                for rec, event in valid:
                    self.joiner.add(event, rec.partition)
                ready = self.joiner.pop_ready()
        self._train(ready)
        # the unit is applied: advance the in-memory state as one step
        _, p, _, end = key
        self.state.ledger.record(key)
        self.state.batches += 1
        self.state.turn = next_turn
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

    def _validate(self, records: list[Record]) -> list[tuple[Record, Event]]:
        """Valid events of ``records``; the rest are dead-lettered (after all store reads)."""
        parsed = [(rec, validate(rec)) for rec in records]
        ids = list(dict.fromkeys(
            c for _, ev in parsed if not isinstance(ev, Rejection)
            for c in (ev.candidate_ids if isinstance(ev, Impression) else [ev.candidate_id])
        ))
        known: set[str] = set()
        if ids:
            mask = self._retry("store", "has_embeddings",
                               lambda: self.store.has_embeddings(self.version, ids))
            known = {c for c, ok in zip(ids, np.asarray(mask, dtype=bool), strict=True) if ok}

        def known_candidates(cids: list[str]) -> list[bool]:
            return [c in known for c in cids]

        out: list[tuple[Record, Event]] = []
        for rec, first in parsed:
            if isinstance(first, Rejection):
                self.dlq.send(rec.value, first, rec)
                event = None
            else:  # parses again, now with the candidate check (its reasons are the DLQ's)
                event = self.dlq.check(rec, known_candidates)
            if event is None:
                self._count("dlq")
            else:
                out.append((rec, event))
        self._count("valid_events", len(out))
        return out

    def _train(self, ready: list[JoinedImpression]) -> None:
        """One optimizer step on ``ready`` (none when nothing in it can teach)."""
        self._count("impressions_joined", len(ready))
        self.metrics.impressions.inc(len(ready))
        if not ready:
            self._count("empty_batches")
            return
        qids, cids = needed_ids(ready)
        with self._timed("fetch"):
            records = self._retry("store", "get_labels",
                                  lambda: self.store.get_labels(self.version, qids))
            texts = self._retry("store", "get_texts", lambda: self.store.get_texts(cids))
        with self._timed("step"):
            self._step(ready, qids, records, cids, texts)

    def _step(self, ready: list[JoinedImpression], qids: list[str], records: list[Any],
              cids: list[str], texts: list[str | None]) -> None:
        batch = build_batch(ready, dict(zip(qids, records, strict=True)),
                            dict(zip(cids, texts, strict=True)))
        s = batch.stats
        for name in ("label_hits", "label_misses", "label_misaligned", "text_misses", "clicks"):
            self._count(name, getattr(s, name))
        self._count("skipped_impressions", s.skipped)
        self._count("rows", s.rows)
        self.metrics.label_hits.inc(s.label_hits)
        self.metrics.label_misses.inc(s.label_misses + s.label_misaligned)
        if not len(batch):
            self._count("empty_batches")
            return
        self.student.train()
        scores = self.student.forward_scores(batch.queries, batch.candidates).scores
        parts = self.loss(scores, batch.mask, teacher_logits=batch.teacher_logits,
                          has_teacher=batch.has_teacher, clicks=batch.clicks, ranks=batch.ranks)
        alpha = self.cfg.alpha
        if not ((alpha > 0 and parts.n_kd) or (alpha < 1 and parts.n_feedback)):
            self._count("empty_batches")  # zero gradient: an AdamW step would still move
            return
        agreement = top1_agreement(scores, batch.teacher_logits, batch.mask, batch.has_teacher)
        self.optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.state.optimizer_steps += 1
        self.metrics.steps.inc()
        loss = float(parts.loss.detach())
        self.counters.update(loss_last=loss, kd_last=parts.kd, feedback_last=parts.feedback)
        self.metrics.loss.labels(part="total").set(loss)
        self.metrics.loss.labels(part="kd").set(parts.kd)
        self.metrics.loss.labels(part="feedback").set(parts.feedback)
        self._observe("loss", loss)
        if agreement is not None:
            self.counters["agreement_last"] = agreement
            self.metrics.agreement.set(agreement)
            self._observe("agreement", agreement)

    def _observe(self, signal_name: str, value: float) -> None:
        batch = self.state.batches
        if self.drift.update(signal_name, value, batch):
            self._count(f"drift_events_{signal_name}")
            self.metrics.drift_events.labels(signal=signal_name).inc()
            log.warning("drift in %s at batch %d (ADWIN mean now %.4f)", signal_name, batch,
                        self.drift.detectors[signal_name].estimation)
        self.metrics.drift_state.labels(signal=signal_name).set(
            int(self.drift.in_drift(signal_name, batch)))

    # -- checkpoint + commit ---------------------------------------------------------------
    def _checkpoint(self) -> None:
        t0 = time.perf_counter()
        self._retry("stream", "flush", self.stream.flush)  # dead letters of these batches
        self.state.joiner = self.joiner.state()
        self.state.counters = dict(self.counters)
        for reason, value in self.joiner.counters.items():
            self.metrics.join_dropped.labels(reason=reason).set(value)
        self.last_checkpoint = self.checkpoints.save(
            self.student, self.optimizer, self.state, self.drift.dumps(),
            before_switch=lambda: self._crash("before_latest"),
        )
        self._last_ckpt = self.state.batches
        self._crash("after_checkpoint")
        self._commit()
        seconds = time.perf_counter() - t0
        self.metrics.checkpoint_seconds.observe(seconds)
        self.phase_seconds["checkpoint"] += seconds
        self.metrics.last_checkpoint.set(self.state.batches)

    def _commit(self) -> None:
        offsets = dict(self.state.offsets)
        self._retry("stream", "commit", lambda: self.stream.commit(self.group, self.topic, offsets))

    def _export_student(self) -> None:
        """Replace ``output_dir`` with the final student (a normal loadable student dir)."""
        out = Path(self.output_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.*-*"):  # left by a process killed here
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        self.student.save(tmp)
        (tmp / "trainer.json").write_text(json.dumps({
            "name": self.cfg.name, "teacher_version": self.version, "batches": self.state.batches,
            "offsets": {str(p): o for p, o in self.state.offsets.items()},
            "checkpoint": None if self.last_checkpoint is None else self.last_checkpoint.name,
        }, indent=1))
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------
    def _count(self, name: str, n: float = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _crash(self, point: str) -> None:
        if (point, self.state.batches) in self._crash_at:
            log.warning("test hook %s: SIGKILL at %s of batch %d", CRASH_ENV, point,
                        self.state.batches)
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def _retry(self, kind: str, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn``; while its backend is unreachable, back off and call it again."""
        error = StoreUnavailable if kind == "store" else StreamUnavailable
        backoff = self.cfg.backoff
        delay, began = backoff.initial_s, None
        while True:
            try:
                result = fn()
            except error as exc:
                now = time.monotonic()
                if began is None:
                    began = now
                    self._count(f"{kind}_outages")
                    (self.metrics.store_outages if kind == "store"
                     else self.metrics.stream_outages).inc()
                    log.warning("%s unavailable (%s): %s; retrying with backoff", kind, what, exc)
                self._count(f"{kind}_retries")
                if kind == "store":
                    self.metrics.store_retries.inc()
                if backoff.give_up_after_s is not None and now - began > backoff.give_up_after_s:
                    raise
                if self._stop:
                    raise _Interrupted from exc
                time.sleep(delay)
                delay = min(delay * backoff.factor, backoff.max_s)
                continue
            if began is not None:
                log.info("%s back after %.1f s (%s)", kind, time.monotonic() - began, what)
            return result

    def summary(self, seconds: float, interrupted: bool = False) -> dict[str, Any]:
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


def run_online(settings: Settings, cfg: OnlineTrainerConfig | None = None) -> dict[str, Any]:
    """Open the configured store and stream, run one trainer, close everything."""
    with OnlineTrainer(settings, cfg) as trainer:
        return trainer.run()


def main(argv: list[str] | None = None) -> int:
    """``python -m student.online``: settings from env/--config, trainer config as JSON."""
    parser = argparse.ArgumentParser(prog="python -m student.online", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--config", help="settings file (.yaml/.toml); else CODISTILL_CONFIG")
    parser.add_argument("--trainer", default="{}",
                        help="OnlineTrainerConfig as JSON, or @FILE holding it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    raw = Path(args.trainer[1:]).read_text() if args.trainer.startswith("@") else args.trainer
    summary = run_online(load_settings(args.config), OnlineTrainerConfig.model_validate_json(raw))
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
