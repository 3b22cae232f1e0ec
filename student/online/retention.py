"""Where each partition's history starts, and what happens when retention removed a prefix.

A log does not keep its records forever (Kafka's retention, ``delete_records``;
the embedded log's :meth:`~streaming.embedded.EmbeddedStream.delete_records`), so
the ledger's invariant is ``[start, next)`` per partition, not ``[0, next)``:

* a **new** trainer begins each partition at its log start (``start_from:
  earliest``) or at its end offset (``latest``: only traffic from now on), and the
  ledger records that start (:meth:`~student.online.checkpoint.Ledger.begin`);
* a **resumed** trainer whose checkpoint offset lies below the log start cannot
  replay what it never applied: the records in between are gone. Silently jumping
  ahead would make a model that differs from every replay of the log, so the
  trainer stops with an error naming the gap - unless ``accept_gap``
  (``--accept-gap``), which records the gap in the ledger (the checkpoint then
  says which offsets were never applied) and continues at the log start.

Batch boundaries stay a pure function of offsets: a partition's batches are
``[start + kB, start + (k+1)B)`` from wherever its history (or an accepted gap)
begins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from codistill.config import OnlineTrainerConfig
from streaming.base import EventStream
from student.online.bootstrap import TrainerError
from student.online.checkpoint import TrainerState
from student.online.faults import Retry

log = logging.getLogger("codistill.trainer")


def gap_message(topic: str, partition: int, offset: int, start: int) -> str:
    """The error a resume below the log start stops with (names the gap and the way out).

    >>> gap_message("ev", 2, 40, 64)[:62]
    'ev[2]: the checkpoint resumes at offset 40 but the log starts '
    """
    return (f"{topic}[{partition}]: the checkpoint resumes at offset {offset} but the log "
            f"starts at {start}: records [{offset}, {start}) ({start - offset}) were removed "
            "before this trainer applied them (retention). Resume with --accept-gap "
            "(accept_gap) to skip them (the ledger records the gap), or start afresh "
            "under another trainer name")


def begin_partitions(state: TrainerState, stream: EventStream, topic: str,
                     partitions: list[int], cfg: OnlineTrainerConfig, retry: Retry,
                     fresh: bool, count: Callable[..., Any]) -> list[int]:
    """Set where each partition starts (new ones) and check a resume against the log start.

    Parameters
    ----------
    state
        The trainer's state: its offsets and ledger are updated in place.
    stream, topic, partitions
        The event log.
    cfg
        ``start_from`` (a new trainer) and ``accept_gap`` (a resume).
    retry
        The trainer's retry function.
    fresh
        True when there is no checkpoint: every partition starts at ``start_from``.
        A resumed trainer starts a partition it has not seen before at its log start.
    count
        ``count(name, n)``: the trainer's counters (``gap_records``).

    Returns
    -------
    list[int]
        The partitions where a gap was accepted (the caller discards plan entries
        recorded past the checkpoint: their records are gone).

    Raises
    ------
    TrainerError
        A checkpoint offset below the log start, without ``accept_gap``.
    """
    gaps: list[int] = []
    for p in partitions:
        start = retry("stream", "start offset", lambda p=p: stream.start_offset(topic, p))
        if p not in state.offsets:
            if fresh and cfg.start_from == "latest":
                start = retry("stream", "end offset", lambda p=p: stream.end_offset(topic, p))
            state.offsets[p] = start
            state.ledger.begin(topic, p, start)
            continue
        nxt = state.offsets[p]
        if start <= nxt:
            continue
        if not cfg.accept_gap:
            raise TrainerError(gap_message(topic, p, nxt, start))
        log.warning("accepting a gap on %s[%d]: records [%d, %d) were removed unapplied",
                    topic, p, nxt, start)
        state.ledger.record_gap(topic, p, nxt, start)
        state.offsets[p] = start
        count("gap_records", start - nxt)
        gaps.append(p)
    return gaps
