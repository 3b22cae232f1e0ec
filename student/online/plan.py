"""The batch plan: every decision the online trainer makes, written down before it acts on it.

A live stream does not wait for the trainer. Which partition has a full batch,
whether a partition's oldest waiting record has waited ``max_batch_wait_s`` (so
its records are applied as a *partial* batch), which partitions are idle (so
their join watermark is advanced: see :func:`idle_advances`), and which store
sequence the batch's labels are read under all depend on *when* the trainer
looks. Exactly-once needs the same updates after a crash, so none of these is
decided twice: each unit becomes a :class:`PlanEntry`, written durably
(:mod:`codistill.fsio`: temp file, fsync, rename, fsync of the folder) *before*
its step is applied, and recovery replays the recorded entries past its
checkpoint instead of deciding afresh. The plan also lets a fresh trainer
replay a whole run (``OnlineTrainerConfig.replay_plan``).

Rules (pure, see :func:`decide`):

* partitions take turns (round robin from the checkpointed turn); the first one
  holding a full batch (``batch_size`` records) is applied;
* if none does, the first whose oldest waiting record is older than
  ``max_batch_wait_s`` is applied as a partial batch (everything up to its end
  offset); otherwise the trainer waits;
* a partition is *idle* when it has had no waiting record for
  ``max_batch_wait_s``; with each applied batch, an idle partition's watermark
  is raised to the minimum watermark of the partitions that are not idle
  (events later arriving on it below that are late, as with Flink's idleness).

Layout: ``<checkpoints>-plan/<batch:09d>.json`` (default
``HOME/online/NAME/checkpoints-plan/``), ``batch`` the trainer's batch count once
the entry is applied (1 for the first unit). The folder belongs to its checkpoint
folder: a trainer started afresh by deleting its checkpoints must delete the
plan too (recorded entries past the checkpoint - none, then - are replayed).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codistill.fsio import atomic_write_json
from streaming.join import Joiner
from student.online.schedule import FLUSH_PARTITION, Batch, Wait

PLAN_SUFFIX = "-plan"  # <checkpoints>-plan/ beside the checkpoint folder
PLAN_FORMAT = 1
# Beside the entries; not ``*.json``, so it is never read as one.
VOCABULARY_FILE = "vocabulary.store-seq"


@dataclass(frozen=True)
class PlanEntry:
    """One unit the trainer applies, with every timing-dependent decision behind it.

    Parameters
    ----------
    batch
        The trainer's batch count once this unit is applied (1-based).
    partition, start, end
        The offsets ``[start, end)``; ``partition`` is ``FLUSH_PARTITION`` for the
        end-of-input joiner flush.
    kind
        ``full``, ``partial`` (``max_batch_wait_s`` expired, or the end of an
        ``until_end`` run) or ``flush``.
    turn, next_turn
        The round-robin turn the unit was taken at, and the turn after it.
    store_seq
        The teacher version's store sequence: every store read of the unit (known
        candidates, labels) is made with ``max_seq=store_seq``.
    advance
        Idle partitions whose join watermark is raised (to microseconds since the
        epoch) before the unit's ready impressions are taken.
    pending
        Candidates the unit's events name that had a stored text but no teacher vector
        under ``store_seq`` when it was planned (a nearline labeller is behind): they
        are trained around, not dead-lettered, and a replay decides the same.
    """

    batch: int
    partition: int
    start: int
    end: int
    kind: str
    turn: int
    next_turn: int
    store_seq: int | None = None
    advance: dict[int, int] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["advance"] = {str(p): t for p, t in sorted(self.advance.items())}
        data["format"] = PLAN_FORMAT
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlanEntry:
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"unsupported plan entry format {data.get('format')!r}")
        fields = {k: v for k, v in data.items() if k != "format"}
        fields["advance"] = {int(p): int(t) for p, t in fields.get("advance", {}).items()}
        return cls(**fields)

    @property
    def is_flush(self) -> bool:
        return self.partition == FLUSH_PARTITION


def decide(
    partitions: Sequence[int],
    offsets: Mapping[int, int],
    ends: Mapping[int, int],
    turn: int,
    batch_size: int,
    ages: Mapping[int, float] | None = None,
    max_wait_s: float | None = None,
) -> Batch | Wait:
    """The live trainer's next unit: a full batch, an expired partial batch, or a wait.

    Parameters
    ----------
    partitions
        Sorted partitions; ``turn % len(partitions)`` is where the round starts.
    offsets, ends
        Next offset to apply and known end offset, per partition.
    turn
        The checkpointed round-robin turn.
    batch_size
        Records per full batch.
    ages
        Seconds the oldest waiting record of each partition has waited (missing: 0).
    max_wait_s
        None: full batches only.

    Returns
    -------
    Batch | Wait
        A :class:`~student.online.schedule.Wait` names the turn's partition.

    Examples
    --------
    Partition 1 has no traffic: partition 0 is not held up by it.

    >>> decide([0, 1], {0: 4, 1: 0}, {0: 10, 1: 0}, turn=1, batch_size=4)
    Batch(partition=0, start=4, end=8, turn=0, next_turn=1)

    Partition 0 holds 2 records, one waiting for 7 s: a partial batch once 5 s pass.

    >>> decide([0, 1], {0: 8, 1: 0}, {0: 10, 1: 0}, 0, 4, {0: 7.0}, max_wait_s=None)
    Wait(partition=0, start=8, turn=0, next_turn=0)
    >>> decide([0, 1], {0: 8, 1: 0}, {0: 10, 1: 0}, 0, 4, {0: 7.0}, max_wait_s=5.0)
    Batch(partition=0, start=8, end=10, turn=0, next_turn=1)
    """
    n = len(partitions)
    if not n:
        raise ValueError("no partitions to schedule")
    order = [(turn + i) % n for i in range(n)]
    for t in order:
        p = partitions[t]
        if ends.get(p, 0) - offsets[p] >= batch_size:
            return Batch(p, offsets[p], offsets[p] + batch_size, t, (t + 1) % n)
    if max_wait_s is not None:
        for t in order:
            p = partitions[t]
            if ends.get(p, 0) > offsets[p] and (ages or {}).get(p, 0.0) >= max_wait_s:
                return Batch(p, offsets[p], ends[p], t, (t + 1) % n)
    p = partitions[turn % n]
    return Wait(p, offsets[p], turn % n, turn % n)


def idle_advances(watermarks: Mapping[int, int | None], idle: Iterable[int]) -> dict[int, int]:
    """The idle partitions' new watermarks: the minimum of the busy partitions' ones.

    Parameters
    ----------
    watermarks
        Current join watermark per partition (microseconds; None: no event yet).
    idle
        Partitions without a waiting record for ``max_batch_wait_s``.

    Returns
    -------
    dict[int, int]
        Only partitions whose watermark would move forward; empty when every
        partition is idle or no busy one has a watermark.

    Examples
    --------
    >>> idle_advances({0: 500, 1: 100, 2: 900}, idle=[1])
    {1: 500}
    >>> idle_advances({0: 500, 1: 700, 2: 900}, idle=[1])
    {}
    >>> idle_advances({0: 500, 1: None}, idle=[0, 1])
    {}
    """
    idle = set(idle)
    busy = [w for p, w in watermarks.items() if p not in idle and w is not None]
    if not busy:
        return {}
    target = min(busy)
    return {p: target for p in sorted(idle)
            if p in watermarks and (watermarks[p] is None or watermarks[p] < target)}


def watermarks_us(joiner: Joiner, partitions: Iterable[int]) -> dict[int, int | None]:
    """Each partition's join watermark in microseconds (None: no event seen yet).

    Partitions the joiner has never seen are left out (nothing to close there).
    """
    seen = joiner.watermarks_us()
    return {p: seen[p] for p in partitions if p in seen}


def advance_watermark(joiner: Joiner, partition: int, watermark_us: int) -> None:
    """Raise ``partition``'s join watermark to ``watermark_us`` and close what it passes.

    :meth:`~streaming.join.Joiner.advance_to`: the advance is saved in the joiner's
    checkpoint state like any event-driven one, and never lowers a watermark.
    """
    joiner.advance_to(partition, watermark_us)


def check_coverage(entries: Iterable[PlanEntry], starts: Mapping[int, int] | None = None
                   ) -> dict[int, tuple[int, int]]:
    """Check a plan's ranges: per partition contiguous, no gap, no overlap.

    Parameters
    ----------
    entries
        The plan, in batch order.
    starts
        Where each partition's history starts (default: its first entry's start).

    Returns
    -------
    dict[int, tuple[int, int]]
        ``partition -> (first offset, next offset)`` the plan covers.

    Raises
    ------
    ValueError
        On a gap, an overlap, or batch numbers that are not 1, 2, 3, ...

    Examples
    --------
    >>> e = [PlanEntry(1, 0, 0, 4, "full", 0, 1), PlanEntry(2, 1, 0, 2, "partial", 1, 0)]
    >>> check_coverage(e)
    {0: (0, 4), 1: (0, 2)}
    >>> check_coverage(e + [PlanEntry(3, 0, 5, 9, "full", 0, 1)])
    Traceback (most recent call last):
    ValueError: plan batch 3: partition 0 continues at 5, expected 4 (a gap)
    """
    covered: dict[int, tuple[int, int]] = {}
    expected_batch = None
    for e in entries:
        if expected_batch is not None and e.batch != expected_batch:
            raise ValueError(f"plan batch {e.batch} follows batch {expected_batch - 1}")
        expected_batch = e.batch + 1
        if e.is_flush:
            continue
        first, nxt = covered.get(e.partition, (None, None))
        if nxt is None:
            nxt = first = (starts or {}).get(e.partition, e.start)
        if e.start != nxt:
            what = "a gap" if e.start > nxt else "an overlap"
            raise ValueError(f"plan batch {e.batch}: partition {e.partition} continues at "
                             f"{e.start}, expected {nxt} ({what})")
        covered[e.partition] = (first, e.end)
    return covered


class PlanLog:
    """The durable plan of one trainer: one JSON file per entry (see the module docstring).

    Parameters
    ----------
    root
        ``<checkpoints>-plan`` for the trainer's own plan; a plan folder (or a
        ``.jsonl`` file with one entry per line) to replay.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, batch: int) -> Path:
        return self.root / f"{batch:09d}.json"

    def write(self, entry: PlanEntry) -> None:
        """Make ``entry`` durable before its unit is applied (replaces a stale one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path(entry.batch), entry.to_json())

    def entries(self, after: int = 0) -> list[PlanEntry]:
        """The recorded entries with ``batch > after``, in batch order."""
        if self.root.is_file():
            lines = self.root.read_text(encoding="utf-8").splitlines()
            out = [PlanEntry.from_json(json.loads(line)) for line in lines if line.strip()]
        elif self.root.is_dir():
            out = [PlanEntry.from_json(json.loads(p.read_text(encoding="utf-8")))
                   for p in sorted(self.root.glob("*.json"))]
        else:
            out = []
        return [e for e in out if e.batch > after]

    def vocabulary_seq(self) -> int | None:
        """The store sequence a fresh trainer fitted its vocabulary under (None: unrecorded).

        A fresh student's subword vocabulary is fitted on the candidates its version
        holds, and a labeller (or a precompute) appends more; a replay must fit on the
        same ones, so the sequence is written down before the fit (``VOCABULARY_FILE``).
        """
        path = self.root / VOCABULARY_FILE
        if not path.is_file():
            return None
        return int(json.loads(path.read_text(encoding="utf-8"))["store_seq"])

    def write_vocabulary_seq(self, seq: int) -> None:
        """Make the vocabulary's store sequence durable (before the fit it pins)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / VOCABULARY_FILE, {"store_seq": int(seq)})

    def discard(self, after: int) -> None:
        """Remove the entries past ``after`` (they can no longer be replayed)."""
        for e in self.entries(after):
            self.path(e.batch).unlink(missing_ok=True)
