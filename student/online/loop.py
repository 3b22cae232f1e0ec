"""The online trainer's loop: decide the next unit, write it into the plan, apply it.

Three sources of units, in this order of precedence:

1. **recorded entries** past the checkpoint (:class:`~student.online.plan.PlanLog`):
   a crash after an entry was written replays exactly that entry, never a fresh
   decision (a fresh one could differ: other end offsets, another store sequence);
2. ``replay_plan``: a plan file or folder of another run; the trainer applies its
   entries and stops when they run out (a fresh trainer that replays a run gives
   that run's weights);
3. a fresh decision: ``until_end`` follows the offset-only schedule
   (:func:`~student.online.schedule.next_batch`), live mode
   :func:`~student.online.plan.decide` (full batches from any partition, partial
   ones after ``max_batch_wait_s``, idle partitions' watermarks advanced).

Each fresh decision is written durably before it is applied.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from streaming.events import Impression, InvalidEvent, parse_event
from student.online.bootstrap import TrainerError
from student.online.plan import PlanEntry, PlanLog, decide, idle_advances, watermarks_us
from student.online.schedule import Batch, Wait, next_batch

# The trainer is typed ``Any`` here: importing its class would make the package's
# import graph cyclic (trainer -> loop -> trainer), which lint-imports refuses.
OnlineTrainer = Any

log = logging.getLogger("codistill.trainer")


class Planner:
    """Fresh decisions for one trainer: end offsets, waiting ages, idle partitions.

    Parameters
    ----------
    trainer
        The running trainer (its stream, state, joiner, keeper and config).
    """

    def __init__(self, trainer: OnlineTrainer) -> None:
        self.tr = trainer
        self.targets: dict[int, int] | None = None
        self.idle_since: dict[int, float] = {}
        self.stamps: dict[int, tuple[int, float]] = {}  # partition -> (offset, append time s)
        self.refreshed = 0.0

    def refresh(self) -> None:
        """Fetch every partition's end offset; note which partitions have nothing waiting."""
        tr, now = self.tr, time.monotonic()
        for p in tr.partitions:
            if tr._end(p) > tr.state.offsets[p]:
                self.idle_since.pop(p, None)
            else:
                self.idle_since.setdefault(p, now)
        self.refreshed = now

    def ages(self) -> dict[int, float]:
        """Seconds the oldest waiting record of each partially filled partition has waited."""
        tr, out = self.tr, {}
        for p in tr.partitions:
            start = tr.state.offsets[p]
            if 0 < tr._ends.get(p, 0) - start < tr.cfg.batch_size:
                if self.stamps.get(p, (None, 0.0))[0] != start:  # append time of that record
                    first = tr._read(p, start, start + 1)[0]
                    self.stamps[p] = (start, first.timestamp_ms / 1000.0)
                out[p] = time.time() - self.stamps[p][1]
        return out

    def next_step(self) -> Batch | Wait | None:
        """The next unit by the configured rule (None: ``until_end`` is finished)."""
        tr, cfg, state = self.tr, self.tr.cfg, self.tr.state
        if cfg.until_end:
            if self.targets is None:
                self.targets = {p: tr._end(p) for p in tr.partitions}
            return next_batch(tr.partitions, state.offsets, tr._ends, state.turn,
                              cfg.batch_size, self.targets,
                              flush=cfg.flush_at_end and not state.flushed)
        if time.monotonic() - self.refreshed >= cfg.poll_interval_s:
            self.refresh()  # no partition is starved by stale end offsets
        step = decide(tr.partitions, state.offsets, tr._ends, state.turn, cfg.batch_size)
        if isinstance(step, Wait):
            self.refresh()
            wait = cfg.max_batch_wait_s
            step = decide(tr.partitions, state.offsets, tr._ends, state.turn, cfg.batch_size,
                          self.ages() if wait is not None else None, wait)
        return step

    def entry(self, step: Batch) -> PlanEntry:
        """The plan entry of ``step``: its kind, store sequence and idle advances."""
        tr, cfg = self.tr, self.tr.cfg
        n = tr.state.batches + 1
        kind = ("flush" if step.is_flush else
                "full" if step.end - step.start == cfg.batch_size else "partial")
        advance: dict[int, int] = {}
        if cfg.max_batch_wait_s is not None and not step.is_flush and not cfg.until_end:
            now = time.monotonic()
            idle = [p for p, t0 in self.idle_since.items()
                    if now - t0 >= cfg.max_batch_wait_s and p != step.partition]
            advance = idle_advances(watermarks_us(tr.joiner, tr.partitions), idle)
        every = cfg.checkpoint_every
        when = f"before batch {n}, so before checkpoint {-(-n // every) * every}"
        if not (cfg.labeller and not step.is_flush):
            return PlanEntry(n, step.partition, step.start, step.end, kind, step.turn,
                             step.next_turn, tr.keeper.sequence(when), advance)
        seq, pending = self.wait_for_labels(step, when)
        return PlanEntry(n, step.partition, step.start, step.end, kind, step.turn,
                         step.next_turn, seq, advance, pending)

    def wait_for_labels(self, step: Batch, when: str) -> tuple[int, list[str]]:
        """The store sequence of ``step`` and its pending candidates, after a bounded wait.

        Candidates its events name with a stored text but no vector are the labeller's
        backlog: wait up to ``label_wait_s`` for their vectors, then take the sequence;
        those still missing under it are pending (recorded in the plan, so a replay
        decides the same). A candidate without a text stays unknown: no labeller can
        embed it, so the validator dead-letters its event as before.
        """
        tr, cfg = self.tr, self.tr.cfg
        ids = candidate_ids(tr._read(step.partition, step.start, step.end))
        deadline = time.monotonic() + cfg.label_wait_s
        while True:
            seq = tr.keeper.sequence(when)
            missing = _missing(tr, ids, seq)
            if missing:
                texts = tr._retry("store", "get_texts", lambda m=missing: tr.store.get_texts(m))
                missing = [c for c, t in zip(missing, texts, strict=True) if t is not None]
            if not missing or time.monotonic() >= deadline:
                return seq, missing
            time.sleep(cfg.poll_interval_s)


def candidate_ids(records: list[Any]) -> list[str]:
    """Unique candidate ids the valid events of ``records`` name (first-seen order)."""
    ids: dict[str, None] = {}
    for rec in records:
        try:
            event = parse_event(rec.value)
        except InvalidEvent:
            continue
        names = event.candidate_ids if isinstance(event, Impression) else [event.candidate_id]
        ids.update(dict.fromkeys(names))
    return list(ids)


def _missing(tr: OnlineTrainer, ids: list[str], seq: int) -> list[str]:
    if not ids:
        return []
    mask = tr._retry("store", "has_embeddings",
                     lambda: tr.store.has_embeddings(tr.version, ids, max_seq=seq))
    return [c for c, ok in zip(ids, mask, strict=True) if not ok]


def run_loop(tr: OnlineTrainer) -> None:
    """Apply recorded, replayed or freshly decided units until done (see the module doc)."""
    cfg, state = tr.cfg, tr.state
    pending = deque(tr.plan.entries(after=state.batches))
    replay = cfg.replay_plan is not None
    if replay:
        pending = deque(PlanLog(cfg.replay_plan).entries(after=state.batches))
    planner, waiting = Planner(tr), False
    while not tr._done():
        tr.keeper.renew_if_due()  # at batch boundaries and while waiting for data
        if pending:
            entry = pending.popleft()
            check_entry(tr, entry)
            if replay:
                tr.plan.write(entry)  # the replaying trainer's own plan, as for a fresh one
        elif replay:
            return
        else:
            step = planner.next_step()
            if step is None:
                return
            state.turn = step.turn  # past the partitions whose records are all applied
            if isinstance(step, Wait):
                p, start = step.partition, step.start
                if cfg.until_end and tr._end(p) >= start + cfg.batch_size:
                    continue  # the cached end offset was stale: the batch is there
                if not waiting:
                    log.info("waiting for a full batch on %s[%d] at offset %d", tr.topic, p,
                             start)
                    waiting = True
                time.sleep(cfg.poll_interval_s)
                continue
            entry = planner.entry(step)
            tr.plan.write(entry)
            tr._crash_hook("after_plan", entry.batch)  # written, not applied
        waiting = False
        state.turn = entry.turn
        records = None if entry.is_flush else tr._read(entry.partition, entry.start, entry.end)
        tr._apply(entry, records)


def check_entry(tr: OnlineTrainer, entry: PlanEntry) -> None:
    """A recorded entry must continue the state exactly (batch number, partition offset)."""
    state = tr.state
    ok = entry.batch == state.batches + 1 and (
        entry.is_flush or state.offsets.get(entry.partition) == entry.start)
    if not ok:
        where = "flush" if entry.is_flush else f"{tr.topic}[{entry.partition}]@{entry.start}"
        raise TrainerError(
            f"plan entry {entry.batch} ({where}) does not continue the trainer's state "
            f"(batch {state.batches}, offsets {state.offsets}): the plan and the checkpoint "
            "come from different histories")
