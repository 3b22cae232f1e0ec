"""What the online trainer exposes: Prometheus metrics and drift detection.

Every trainer owns a :class:`~prometheus_client.CollectorRegistry` (two trainers
in one process, e.g. tests, do not collide), served with ``start_http_server``
when a port is configured. Names are prefixed ``codistill_trainer_``; the DLQ
counter is the shared ``codistill_dlq_events_total`` of :mod:`streaming.dlq`,
registered on the same registry.

Why here and not in the learner: a metric or a drift event is about the *run*
(batch numbers, checkpoints, restarts), so the trainer feeds these from the
statistics the learner returns.

Drift: one ``river.drift.ADWIN`` per signal - the per-batch online loss and the
teacher-student top-1 agreement on the batch's labelled queries. ADWIN keeps an
adaptive window and flags a change when two sub-windows' means differ
significantly; a flag is a *drift event*. The ``drift_state`` gauge stays 1 for
``hold_batches`` batches after an event so a 15 s scrape interval cannot miss it.
Checkpoints keep each detector's recent inputs as JSON (no pickle: it runs code when
loaded), and a restarted trainer replays them (see :class:`DriftMonitor`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from streaming.dlq import dlq_counter

log = logging.getLogger("codistill.trainer")
PREFIX = "codistill_trainer_"
SIGNALS = ("loss", "agreement")


class DriftMonitor:
    """ADWIN per signal; counts events, remembers the batch of the last one, keeps its inputs.

    The detectors' state goes into checkpoints as JSON (:meth:`to_json`): river's
    ADWIN state is opaque, and pickle - the only way to save it whole - runs code
    when loaded. What is saved instead is each signal's inputs since its detector
    last reset (ADWIN starts afresh on the update after a drift), at most
    ``window`` of them; :meth:`from_json` replays them into fresh detectors. The
    rebuilt detector equals the uninterrupted one when the window held every input
    since that reset (``truncated`` False); otherwise it holds the last ``window``
    inputs only - a shorter window, so its mean and its next drift call may differ.

    Parameters
    ----------
    delta
        ADWIN confidence (smaller: fewer, surer events).
    hold_batches
        Batches during which :meth:`in_drift` stays True after an event.
    window
        Inputs per signal kept for the checkpoint (``drift_window``).
    """

    def __init__(self, delta: float = 0.002, hold_batches: int = 10, window: int = 2000) -> None:
        from river import drift  # imported here, when a trainer starts: river is slow to import

        self.delta = delta
        self.hold_batches = hold_batches
        self.window = window
        self.detectors = {s: drift.ADWIN(delta=delta) for s in SIGNALS}
        self.events = dict.fromkeys(SIGNALS, 0)
        self.last_event: dict[str, int | None] = dict.fromkeys(SIGNALS, None)
        self.inputs: dict[str, deque[float]] = {s: deque(maxlen=window) for s in SIGNALS}
        self.truncated = dict.fromkeys(SIGNALS, False)

    def update(self, signal: str, value: float, batch: int) -> bool:
        """Feed one per-batch value.

        Parameters
        ----------
        signal
            ``"loss"`` or ``"agreement"``.
        value
            The batch's value.
        batch
            The trainer's batch count (remembered as the event's batch).

        Returns
        -------
        bool
            True when this value completes a drift event.
        """
        if self._feed(signal, float(value)):
            self.events[signal] += 1
            self.last_event[signal] = batch
            return True
        return False

    def _feed(self, signal: str, value: float) -> bool:
        detector, inputs = self.detectors[signal], self.inputs[signal]
        if detector.drift_detected:  # ADWIN resets on this update: its history starts again
            inputs.clear()
            self.truncated[signal] = False
        if len(inputs) == inputs.maxlen:
            self.truncated[signal] = True
        inputs.append(value)
        detector.update(value)
        return bool(detector.drift_detected)

    def in_drift(self, signal: str, batch: int) -> bool:
        last = self.last_event[signal]
        return last is not None and batch - last < self.hold_batches

    def state(self, batch: int) -> dict[str, Any]:
        return {
            s: {"events": self.events[s], "last_event_batch": self.last_event[s],
                "in_drift": self.in_drift(s, batch), "mean": self.detectors[s].estimation,
                "window": self.detectors[s].width}
            for s in SIGNALS
        }

    def to_json(self) -> dict[str, Any]:
        """Settings, event counts and each signal's inputs since its last reset (JSON-ready)."""
        return {"delta": self.delta, "hold_batches": self.hold_batches, "window": self.window,
                "events": dict(self.events), "last_event": dict(self.last_event),
                "inputs": {s: list(v) for s, v in self.inputs.items()},
                "truncated": dict(self.truncated)}

    @classmethod
    def from_json(cls, data: dict[str, Any], window: int | None = None) -> DriftMonitor:
        """Rebuild a monitor from :meth:`to_json` by replaying the saved inputs.

        Parameters
        ----------
        data
            What :meth:`to_json` returned (after a JSON round trip).
        window
            Inputs to keep from now on; default the saved monitor's.

        Returns
        -------
        DriftMonitor
            Equal to the saved one when no signal was ``truncated`` (see the class).
        """
        monitor = cls(float(data["delta"]), int(data["hold_batches"]),
                      int(window or data["window"]))
        for s in SIGNALS:
            saved = [float(v) for v in data["inputs"].get(s, [])]
            for value in saved[-monitor.window:]:
                monitor._feed(s, value)  # a replay: not new events
            monitor.truncated[s] = (monitor.truncated[s] or bool(data["truncated"].get(s))
                                    or len(saved) > monitor.window)
            monitor.events[s] = int(data["events"].get(s, 0))
            last = data["last_event"].get(s)
            monitor.last_event[s] = None if last is None else int(last)
        return monitor


class RateMeter:
    """Events per second over a sliding wall-clock window."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()
        self.total = 0

    def add(self, n: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self.total += n
        self.samples.append((now, self.total))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        t0, n0 = self.samples[0]
        return (self.total - n0) / (now - t0) if now > t0 else 0.0


class TrainerMetrics:
    """The trainer's Prometheus metrics on its own registry.

    Parameters
    ----------
    registry
        Where to register them; default a new, private registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        self.info = gauge("info", "Constant 1, labelled with the trainer and its teacher version",
                          ("name", "teacher_version"))
        self.events = counter("events_consumed", "Records read from the events topic")
        self.events_rate = gauge("events_per_second", "Records consumed per second (10 s window)")
        self.lag = gauge("lag", "End offset minus the trainer's next offset", ("partition",))
        self.batches = counter("batches_applied", "Offset batches applied to the model")
        self.steps = counter("optimizer_steps", "Optimizer steps taken")
        self.impressions = counter("impressions_joined", "Joined impressions handed to training")
        self.label_hits = counter("label_hits", "Impressions whose query had a teacher record")
        self.label_misses = counter("label_misses", "Impressions trained on feedback only "
                                    "(no teacher record, or one not covering the shown list)")
        self.store_outages = counter("store_outages", "Times the label store became unreachable")
        self.store_retries = counter("store_retries", "Retried store calls during outages")
        self.stream_outages = counter("stream_outages", "Times the stream became unreachable")
        self.join_dropped = gauge("join_dropped", "Events the joiner dropped, by reason "
                                  "(cumulative since the first checkpoint)", ("reason",))
        self.loss = gauge("loss", "Per-batch online loss, by part", ("part",))
        self.agreement = gauge("agreement", "Teacher-student top-1 agreement on the last batch")
        self.drift_state = gauge("drift_state", "1 while a recent drift event is held",
                                 ("signal",))
        self.drift_events = counter("drift_events", "ADWIN drift events", ("signal",))
        self.checkpoint_seconds = Histogram(
            PREFIX + "checkpoint_seconds", "Time to write a checkpoint and commit offsets",
            registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.last_checkpoint = gauge("last_checkpoint_batch", "Batch count of the last checkpoint")
        self.dlq = dlq_counter(r)  # codistill_dlq_events_total{reason}
        for signal in SIGNALS:
            self.drift_state.labels(signal=signal).set(0)
            self.drift_events.labels(signal=signal)
        self._rate = RateMeter()
        self.port: int | None = None
        self._server: Any = None

    def observe_drift(self, drift: DriftMonitor, signal: str, value: float, batch: int) -> bool:
        """Feed ``drift`` one per-batch value and update the drift metrics.

        Parameters
        ----------
        drift
            The trainer's monitor.
        signal
            ``"loss"`` or ``"agreement"``.
        value
            The batch's value.
        batch
            The trainer's batch count.

        Returns
        -------
        bool
            True when the value completes a drift event (logged and counted here).
        """
        event = drift.update(signal, value, batch)
        if event:
            self.drift_events.labels(signal=signal).inc()
            log.warning("drift in %s at batch %d (ADWIN mean now %.4f)", signal, batch,
                        drift.detectors[signal].estimation)
        self.drift_state.labels(signal=signal).set(int(drift.in_drift(signal, batch)))
        return event

    def consumed(self, n: int) -> None:
        self.events.inc(n)
        self.events_rate.set(self._rate.add(n))

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``port`` (0 = off); returns the port."""
        if port:
            self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
            self.port = port
        return port

    def close(self) -> None:
        """Stop the HTTP server (a long-running trainer never needs to; tests do)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """A sample's current value (for tests and the summary)."""
        return self.registry.get_sample_value(name, labels or {})
