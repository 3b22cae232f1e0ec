"""Which offset range the online trainer applies next, as a pure function of offsets.

Exactly-once training needs the *same* log to yield the *same* sequence of updates,
however often the trainer is killed and restarted. So batch boundaries depend on
nothing but offsets: batch ``k`` of partition ``p`` is offsets ``[kB, (k+1)B)``,
partitions take turns in sorted order, and a batch is taken only when it is
complete. Keeping this rule free of I/O, clocks and the model lets it be tested on
its own (see the doctest of :func:`plan`) and lets the trainer replay it after a
crash from nothing but its checkpointed offsets and turn.

``until_end`` (the producer is known to be finished; tests and the demo) adds an
ending: once no partition has a full batch left before its target offset, each
partition's final partial batch is applied in partition order, then one *flush*
unit (``FLUSH_PARTITION``) releases what the joiner still holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

FLUSH_PARTITION = -1  # ledger partition of the end-of-input joiner flush (until_end mode)


@dataclass(frozen=True)
class Batch:
    """Apply offsets ``[start, end)`` of ``partition`` next.

    Parameters
    ----------
    partition
        The partition, or ``FLUSH_PARTITION`` for the final joiner flush (whose
        ``[start, end)`` is ``[total, total + 1)``, ``total`` the sum of all offsets).
    start, end
        The offset range; ``end - start`` is the batch size except for the final
        partial batches of ``until_end``.
    turn
        The round-robin turn at which the batch is taken (partitions whose records
        are all applied were skipped to reach it).
    next_turn
        The turn once the batch is applied.
    """

    partition: int
    start: int
    end: int
    turn: int
    next_turn: int

    @property
    def is_flush(self) -> bool:
        return self.partition == FLUSH_PARTITION


@dataclass(frozen=True)
class Wait:
    """The partition whose turn it is has no complete batch below its known end offset.

    ``turn`` is that partition's turn; ``next_turn`` the turn after it (the live
    rule, :func:`student.online.plan.decide`, returns ``next_turn == turn``). A
    caller may refresh the end offset and ask again before it waits.
    """

    partition: int
    start: int
    turn: int
    next_turn: int


def next_batch(
    partitions: Sequence[int],
    offsets: Mapping[int, int],
    ends: Mapping[int, int],
    turn: int,
    batch_size: int,
    targets: Mapping[int, int] | None = None,
    flush: bool = False,
) -> Batch | Wait | None:
    """The next unit to apply, a :class:`Wait`, or None when everything is applied.

    Parameters
    ----------
    partitions
        The topic's partitions in sorted order; ``turn % len(partitions)`` indexes it.
    offsets
        The next offset to apply, per partition.
    ends
        The end offsets known so far, per partition (missing: 0).
    turn
        The round-robin position (the trainer's checkpointed ``turn``).
    batch_size
        Records per batch per partition (``B``).
    targets
        ``until_end`` mode: the end offset to stop at per partition. None (live
        mode): full batches only, forever.
    flush
        ``until_end`` mode: end with the joiner flush unit (the caller passes False
        once it has been applied, or when ``flush_at_end`` is off).

    Returns
    -------
    Batch | Wait | None
        None only in ``until_end`` mode, once every target and the flush are applied.

    Examples
    --------
    >>> next_batch([0, 1], {0: 4, 1: 0}, {0: 10, 1: 3}, turn=1, batch_size=4)
    Wait(partition=1, start=0, turn=1, next_turn=0)
    >>> next_batch([0, 1], {0: 4, 1: 0}, {0: 10, 1: 8}, turn=1, batch_size=4)
    Batch(partition=1, start=0, end=4, turn=1, next_turn=0)
    """
    n = len(partitions)
    if targets is not None and all(targets[p] - offsets[p] < batch_size for p in partitions):
        for p in partitions:  # the producer is finished: what is left, in partition order
            if offsets[p] < targets[p]:
                return Batch(p, offsets[p], targets[p], turn, turn)
        if flush:
            total = sum(offsets.values())
            return Batch(FLUSH_PARTITION, total, total + 1, turn, turn)
        return None
    if not n:
        raise ValueError("no partitions to schedule")
    for _ in range(n):  # some partition has a full batch left, so this finds it within a round
        p = partitions[turn % n]
        start = offsets[p]
        nxt = (turn + 1) % n
        if targets is not None and targets[p] - start < batch_size:
            turn = nxt  # retired: its remaining records are a partial batch, applied last
            continue
        if ends.get(p, 0) < start + batch_size:
            return Wait(p, start, turn, nxt)
        return Batch(p, start, start + batch_size, turn, nxt)
    raise AssertionError("unreachable: a round found no partition with a full batch")


def plan(
    partitions: Sequence[int],
    ends: Mapping[int, int],
    batch_size: int,
    offsets: Mapping[int, int] | None = None,
    turn: int = 0,
    flush: bool = True,
) -> list[Batch]:
    """Every unit an ``until_end`` run applies to a finished log, in order.

    Parameters
    ----------
    partitions
        Sorted partitions.
    ends
        End offset per partition; they are also the ``until_end`` targets.
    batch_size
        Records per batch per partition.
    offsets
        Where to start (a checkpoint's offsets); default 0 everywhere.
    turn
        The starting turn.
    flush
        End with the joiner flush unit.

    Returns
    -------
    list[Batch]
        The full batches in turn order, then the partial batches, then the flush.

    Examples
    --------
    Two partitions holding 5 and 2 records, batches of 2: partition 1 runs out of
    full batches first and is skipped; the partial batch of partition 0 and the
    flush come last.

    >>> [(b.partition, b.start, b.end) for b in plan([0, 1], {0: 5, 1: 2}, batch_size=2)]
    [(0, 0, 2), (1, 0, 2), (0, 2, 4), (0, 4, 5), (-1, 7, 8)]
    """
    current = {p: 0 for p in partitions} if offsets is None else dict(offsets)
    out: list[Batch] = []
    while True:
        step = next_batch(partitions, current, ends, turn, batch_size, ends, flush)
        if step is None:
            return out
        if isinstance(step, Wait):  # cannot happen below the targets; guards against a loop
            raise ValueError(f"partition {step.partition} lacks records below its end offset")
        out.append(step)
        turn = step.next_turn
        if step.is_flush:
            flush = False
        else:
            current[step.partition] = step.end
