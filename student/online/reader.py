"""Reading one scheduled offset range of a partition, and validating what it holds.

A batch is defined by its offsets, so the reader must return *exactly* the
records ``[start, end)`` - never fewer (a short read would move every later batch
boundary), never a gap (compacted or transactional topics are refused rather
than silently renumbered). Validation turns records into events and sends the
rest to the dead-letter queue with their reason: malformed JSON or schema, and
impressions or feedback naming a candidate the trainer's teacher version does not
know. Both go through the trainer's retry function, so an unreachable backend
is waited out instead of skipping a batch, and all store reads of a batch happen
before its first dead letter is sent: a retried batch never dead-letters twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from stores.base import Store
from streaming import StreamError
from streaming.base import EventStream, Record
from streaming.dlq import DeadLetterQueue, Rejection, validate
from streaming.events import Event, Impression
from student.online.faults import Interrupted, Retry


def read_range(
    stream: EventStream,
    topic: str,
    partition: int,
    start: int,
    end: int,
    retry: Retry,
    stopping: Callable[[], bool] = lambda: False,
) -> list[Record]:
    """Exactly the records ``[start, end)`` of ``topic[partition]`` (known to exist).

    Parameters
    ----------
    stream
        The event log.
    topic, partition
        Where to read.
    start, end
        The offset range, below the partition's end offset.
    retry
        The trainer's retry function; each ``stream.read`` goes through it.
    stopping
        True once a stop was requested: an empty read then raises :class:`Interrupted`
        instead of polling again.

    Returns
    -------
    list[Record]
        ``end - start`` records with offsets ``start, start + 1, ...``.

    Raises
    ------
    StreamError
        When offsets are missing (100 empty reads in a row) or skipped.
    """
    out: list[Record] = []
    empty = 0
    while start + len(out) < end:
        at = start + len(out)
        got = retry("stream", "read",
                    lambda at=at: stream.read(topic, partition, at, end - at))
        if not got:
            empty += 1
            if empty > 100:
                raise StreamError(f"{topic}[{partition}]: offsets [{at}, {end}) below the end "
                                  "offset could not be read")
            if stopping():
                raise Interrupted
            time.sleep(min(0.01 * empty, 0.5))
            continue
        for i, rec in enumerate(got):
            if rec.offset != at + i:
                raise StreamError(f"{topic}[{partition}]: expected offset {at + i}, got "
                                  f"{rec.offset} (compacted or transactional topics are "
                                  "not supported)")
        out += got[: end - at]
    return out


def validate_records(
    records: list[Record],
    store: Store,
    version: str,
    dlq: DeadLetterQueue,
    retry: Retry,
    count: Callable[..., Any],
    max_seq: int | None = None,
    pending: Collection[str] = (),
) -> list[tuple[Record, Event]]:
    """The valid events of ``records``; the rest are dead-lettered, after all store reads.

    Parameters
    ----------
    records
        One batch, in offset order.
    store
        The label store; one batched ``has_embeddings`` call checks every candidate id.
    version
        The trainer's teacher version, whose candidates are "known".
    dlq
        Where rejected records go, with their reason.
    retry
        The trainer's retry function, for the store call.
    count
        ``count(name, n=1)``: the trainer's counters (``dlq``, ``valid_events``,
        ``pending_candidates``).
    max_seq
        The batch's store sequence (its plan entry's): a candidate appended to the
        version after it is unknown to this batch, however late the batch runs.
    pending
        Candidates the plan entry recorded as waiting for the labeller: not a reason to
        dead-letter (the batch trains around them).

    Returns
    -------
    list[tuple[Record, Event]]
        The records that passed, with their parsed events, in order.
    """
    parsed = [(rec, validate(rec)) for rec in records]
    ids = list(dict.fromkeys(
        c for _, ev in parsed if not isinstance(ev, Rejection)
        for c in (ev.candidate_ids if isinstance(ev, Impression) else [ev.candidate_id])
    ))
    known: set[str] = set(pending)
    if pending:
        count("pending_candidates", len(pending))
    if ids:
        mask = retry("store", "has_embeddings",
                     lambda: store.has_embeddings(version, ids, max_seq=max_seq))
        known |= {c for c, ok in zip(ids, np.asarray(mask, dtype=bool), strict=True) if ok}

    def known_candidates(cids: list[str]) -> list[bool]:
        return [c in known for c in cids]

    out: list[tuple[Record, Event]] = []
    for rec, first in parsed:
        if isinstance(first, Rejection):
            dlq.send(rec.value, first, rec)
            event = None
        else:  # parses again, now with the candidate check (its reasons are the DLQ's)
            event = dlq.check(rec, known_candidates)
        if event is None:
            count("dlq")
        else:
            out.append((rec, event))
    count("valid_events", len(out))
    return out
