"""Resuming an online trainer from its checkpoint: what must agree, and what comes back.

A checkpoint's weights were made by one topic, one batch schedule and one set of
hyperparameters; resuming continues *as if the trainer had never stopped* only
when all three are the same. So a resume compares the configuration with the
checkpoint's and refuses every difference, listing each ``name: old -> new``.
Changing the learning rate, the loss weights and so on is sometimes what an
operator wants: ``accept_changes`` (``--accept-changes``) accepts the differences
and records a new **segment** in the checkpoint state - the batch count and
offsets where it starts and its hyperparameters - so the history of a model
stays readable from its checkpoints. ``batch_size`` is refused even then: batch
``k`` of a partition is offsets ``[kB, (k+1)B)``, so another ``B`` would cut
batches across the ledger's applied ranges and make a replay after a crash apply
other batches than the run it replays. Change it under another trainer name (a
warm start from this one's student).

Without an explicit change the learning rate and weight decay come back from the
optimizer's saved state, as before; with one, they are set on the restored
optimizer (its saved ``param_groups`` carry the old values).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from codistill.config import OnlineTrainerConfig
from streaming.base import EventStream
from streaming.join import Joiner
from student.base import Student
from student.online.bootstrap import TrainerError
from student.online.checkpoint import Checkpoint, TrainerState, restore_rng
from student.online.faults import Retry
from student.online.learner import OnlineLearner
from student.online.telemetry import DriftMonitor

log = logging.getLogger("codistill.trainer")
HYPERPARAMETERS = ("lr", "alpha", "eta", "temperature", "batch_size", "max_ipw_weight",
                   "weight_decay", "max_grad_norm")


def hyperparameters(cfg: OnlineTrainerConfig) -> dict[str, Any]:
    """The values of :data:`HYPERPARAMETERS` in ``cfg`` (JSON-ready)."""
    return {k: getattr(cfg, k) for k in HYPERPARAMETERS}


def first_segment(cfg: OnlineTrainerConfig) -> dict[str, Any]:
    """The segment a fresh trainer starts: batch 0, offset 0, ``cfg``'s hyperparameters."""
    return {"start_batches": 0, "start_offsets": {}, "hyperparameters": hyperparameters(cfg),
            "changed": {}}


def check_config(ckpt: Checkpoint, cfg: OnlineTrainerConfig, topic: str) -> dict[str, Any] | None:
    """Refuse a resume under another topic, batch size or (unaccepted) hyperparameters.

    Parameters
    ----------
    ckpt
        The checkpoint resumed from.
    cfg
        This run's config.
    topic
        This run's events topic.

    Returns
    -------
    dict | None
        The new segment when ``cfg.accept_changes`` accepted differences, else None.

    Raises
    ------
    TrainerError
        On another topic, another ``batch_size`` (always) or other hyperparameters
        without ``accept_changes``; the message lists each difference.
    """
    st = ckpt.state
    if st.topic != topic:
        raise TrainerError(f"checkpoint {ckpt.path} was written for topic {st.topic!r}, this "
                           f"run reads {topic!r}. Use another trainer name to start afresh.")
    new = hyperparameters(cfg)
    old = saved_hyperparameters(ckpt)
    diff = {k: (old[k], new[k]) for k in HYPERPARAMETERS if k in old and old[k] != new[k]}
    listing = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
    if "batch_size" in diff:
        raise TrainerError(
            f"checkpoint {ckpt.path} differs in {listing}. batch_size is refused even with "
            "accept_changes: batch boundaries are multiples of it, so another value would cut "
            "batches across the ledger's applied ranges and a replay after a crash would apply "
            "other batches. Use another trainer name (warm-started from this student).")
    if not diff:
        return None
    if not cfg.accept_changes:
        raise TrainerError(
            f"checkpoint {ckpt.path} was trained with other hyperparameters: {listing}. "
            "Resume with the checkpoint's values, or accept the changes (accept_changes, "
            "--accept-changes) to start a new segment with them.")
    log.warning("resuming %s with accepted changes (%s): a new segment starts at batch %d",
                ckpt.path, listing, st.batches)
    return {"start_batches": st.batches,
            "start_offsets": {str(p): o for p, o in sorted(st.offsets.items())},
            "hyperparameters": new, "changed": {k: list(v) for k, v in diff.items()}}


def saved_hyperparameters(ckpt: Checkpoint) -> dict[str, Any]:
    """The checkpoint's hyperparameters: its last segment's, or what older checkpoints show.

    Checkpoints written before segments existed record ``batch_size`` only; their
    learning rate and weight decay are read from the optimizer's param groups.
    """
    if ckpt.state.segments:
        return dict(ckpt.state.segments[-1]["hyperparameters"])
    known: dict[str, Any] = {"batch_size": ckpt.state.batch_size}
    groups = ckpt.optimizer_state.get("param_groups") or [{}]
    known.update({k: groups[0][k] for k in ("lr", "weight_decay") if k in groups[0]})
    return known


def restore(ckpt: Checkpoint, student: Student, cfg: OnlineTrainerConfig,
            segment: dict[str, Any] | None) -> tuple[OnlineLearner, Joiner, DriftMonitor]:
    """The learner, joiner and drift monitor of ``ckpt``; the RNGs set back to its state.

    Parameters
    ----------
    ckpt
        The checkpoint (its state is updated: an accepted ``segment`` is appended,
        and a checkpoint without segments gets its first one).
    student
        ``Student.load(ckpt.path, ...)``, loaded *before* this call (its module init
        draws from the RNGs restored here).
    cfg
        This run's config (the learner's hyperparameters; ``drift_window``).
    segment
        What :func:`check_config` returned.

    Returns
    -------
    tuple[OnlineLearner, Joiner, DriftMonitor]
    """
    st = ckpt.state
    learner = OnlineLearner.from_config(student, cfg)
    learner.optimizer.load_state_dict(ckpt.optimizer_state)
    if segment is not None:
        set_optimizer_hyperparameters(learner.optimizer, cfg)
        st.segments.append(segment)
    elif not st.segments:  # an older checkpoint: its values agreed with cfg's, record them
        st.segments.append({**first_segment(cfg), "start_batches": st.batches,
                            "start_offsets": {str(p): o for p, o in sorted(st.offsets.items())},
                            "note": "first recorded on resume"})
    restore_rng(st, ckpt.rng)
    drift = (DriftMonitor.from_json(ckpt.drift, window=cfg.drift_window)
             if ckpt.drift is not None else DriftMonitor(cfg.drift_delta, window=cfg.drift_window))
    return learner, Joiner.from_state(st.joiner), drift


def set_optimizer_hyperparameters(optimizer: torch.optim.Optimizer,
                                  cfg: OnlineTrainerConfig) -> None:
    """Put ``cfg``'s learning rate and weight decay into a restored optimizer's groups."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
        group["weight_decay"] = cfg.weight_decay


def check_resume_point(state: TrainerState, stream: EventStream, group: str, topic: str,
                       partitions: list[int], retry: Retry) -> None:
    """The checkpoint's offsets must match its ledger; warn if the group is ahead.

    Parameters
    ----------
    state
        The resumed state.
    stream, group, topic, partitions
        Where the trainer reads and commits.
    retry
        The trainer's retry function.

    Raises
    ------
    LedgerViolation
        When offsets and ledger disagree.
    """
    state.ledger.check_resume(topic, {p: state.offsets[p] for p in partitions})
    for p in partitions:
        nxt = state.offsets[p]
        committed = retry("stream", "committed", lambda p=p: stream.committed(group, topic, p))
        if committed is not None and committed > nxt:
            log.warning("group %s committed %s[%d] up to %d, past the checkpoint's %d: "
                        "another consumer uses this group? Resuming from the checkpoint",
                        group, topic, p, committed, nxt)
