"""Faults the online trainer must survive: outages, stop signals, and (tested) SIGKILLs.

* **Outages.** The trainer may not skip a batch because Redis or Kafka is briefly
  down - a skipped batch is a different model - so every backend call goes through
  one retry function that waits the outage out (exponential backoff, capped,
  optionally giving up after a while), counts it, and stops waiting when a stop was
  requested. Readers and bootstrap code take that function as an argument
  (:class:`Retry`), so they retry exactly as the trainer does without knowing its
  counters. A backend that comes back may have come back *empty* (a Redis without
  persistence): the retry then calls its ``on_recovered`` hook before it hands the
  answer back, and the trainer checks its teacher version first
  (:mod:`~student.online.keeper`).
* **Stop signals.** SIGTERM / SIGINT only *request* a stop: the current batch is
  finished, checkpointed and committed first.
* **Crashes.** Exactly-once is only as good as its test, which kills the trainer in
  its most dangerous windows: ``CODISTILL_TRAINER_CRASH_AT="after_step:5,..."``
  makes the process SIGKILL itself at those points (:class:`CrashHook`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from codistill.config import BackoffConfig
from stores import StoreUnavailable
from streaming import StreamUnavailable

log = logging.getLogger("codistill.trainer")
T = TypeVar("T")

CRASH_ENV = "CODISTILL_TRAINER_CRASH_AT"
CRASH_POINTS = ("after_plan", "after_step", "before_latest", "after_checkpoint")


class Interrupted(Exception):
    """Stop requested while a batch was half done: exit without checkpointing it."""


class Retry(Protocol):
    """``retry(kind, what, fn)``: call ``fn`` until its backend (``"store"``/``"stream"``) is
    reachable; may raise :class:`Interrupted` on a stop request."""

    def __call__(self, kind: str, what: str, fn: Callable[[], T]) -> T: ...


class BackoffRetry:
    """The trainer's :class:`Retry`: capped exponential backoff while a backend is down.

    Parameters
    ----------
    backoff
        Initial delay, factor, cap and the optional give-up time.
    count
        ``count(name)``: the trainer's counters (``store_outages``, ``store_retries``,
        ``stream_outages``, ``stream_retries``).
    metrics
        The trainer's metrics (``store_outages``, ``store_retries``, ``stream_outages``).
    stopping
        True once a stop was requested: the retry then raises :class:`Interrupted`.
    on_recovered
        ``on_recovered(kind)``, called when a call succeeds after an outage, *before*
        its result is handed back: a backend that comes back may have lost its data
        (a Redis without persistence), so the caller checks before it uses the answer.
        May raise; the result is then discarded.
    """

    def __init__(self, backoff: BackoffConfig, count: Callable[[str], Any], metrics: Any,
                 stopping: Callable[[], bool],
                 on_recovered: Callable[[str], None] | None = None) -> None:
        self.backoff = backoff
        self.count = count
        self.metrics = metrics
        self.stopping = stopping
        self.on_recovered = on_recovered

    def __call__(self, kind: str, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn``; while its backend is unreachable, back off and call it again.

        Parameters
        ----------
        kind
            ``"store"`` (retries on ``StoreUnavailable``) or ``"stream"``
            (``StreamUnavailable``).
        what
            The call, for the log.
        fn
            The call itself.

        Returns
        -------
        Any
            What ``fn`` returned.
        """
        error = StoreUnavailable if kind == "store" else StreamUnavailable
        backoff = self.backoff
        delay, began = backoff.initial_s, None
        while True:
            try:
                result = fn()
            except error as exc:
                now = time.monotonic()
                if began is None:
                    began = now
                    self.count(f"{kind}_outages")
                    (self.metrics.store_outages if kind == "store"
                     else self.metrics.stream_outages).inc()
                    log.warning("%s unavailable (%s): %s; retrying with backoff", kind, what, exc)
                self.count(f"{kind}_retries")
                if kind == "store":
                    self.metrics.store_retries.inc()
                if backoff.give_up_after_s is not None and now - began > backoff.give_up_after_s:
                    raise
                if self.stopping():
                    raise Interrupted from exc
                time.sleep(delay)
                delay = min(delay * backoff.factor, backoff.max_s)
                continue
            if began is not None:
                log.info("%s back after %.1f s (%s)", kind, time.monotonic() - began, what)
                if self.on_recovered is not None:
                    self.on_recovered(kind)
            return result


def stop_on_signals(request_stop: Callable[[], None]) -> Callable[[], None]:
    """Make SIGTERM and SIGINT call ``request_stop`` (main thread only; elsewhere a no-op).

    Parameters
    ----------
    request_stop
        Called from the signal handler.

    Returns
    -------
    Callable[[], None]
        Restores the previous handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, lambda *_: request_stop())

    def restore() -> None:
        for s, handler in old.items():
            signal.signal(s, handler)

    return restore


class CrashHook:
    """The test hook: SIGKILL this process at ``(point, batch)`` pairs read from ``CRASH_ENV``.

    Points: ``after_plan`` (plan entry ``BATCH`` written, its unit not applied),
    ``after_step`` (a batch applied, not checkpointed), ``before_latest`` (a
    checkpoint renamed into place, ``LATEST`` not yet switched), ``after_checkpoint``
    (``LATEST`` switched, offsets not yet committed).

    Parameters
    ----------
    spec
        ``"POINT:BATCH,..."``; default: the environment variable ``CRASH_ENV``.
    """

    def __init__(self, spec: str | None = None) -> None:
        spec = (os.environ.get(CRASH_ENV, "") if spec is None else spec).strip()
        self.points: set[tuple[str, int]] = set()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            point, _, batch = item.partition(":")
            if point not in CRASH_POINTS or not batch.isdigit():
                raise ValueError(f"{CRASH_ENV}: bad item {item!r} (want POINT:BATCH, POINT in "
                                 f"{CRASH_POINTS})")
            self.points.add((point, int(batch)))

    def __call__(self, point: str, batch: int) -> None:
        """SIGKILL the process if ``(point, batch)`` was asked for."""
        if (point, batch) in self.points:
            log.warning("test hook %s: SIGKILL at %s of batch %d", CRASH_ENV, point, batch)
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
