"""What an online trainer distils from and into: the teacher version and a new student.

A trainer distils from one teacher version for its whole life (its checkpoints'
weights only make sense against that version's soft labels and, for query-only
students, its candidate vectors), so the version is resolved once, from the
checkpoint when there is one, and refused when it is unknown or half-written. A
fresh trainer builds its student here: a warm start from a student directory, or a
bag-of-subwords student whose vocabulary is fitted on the version's
candidate texts (and the train split's queries); a finished run exports the
student as a normal student directory (:func:`export_student`). Every store read
goes through the trainer's retry function.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from codistill.config import OnlineTrainerConfig, Settings
from codistill.fsio import publish_dir, write_synced
from stores.base import Store
from student.asym import StoreCandidates
from student.base import Student
from student.bow import BowConfig, BowStudent
from student.online.faults import Retry
from student.online.plan import PlanLog
from student.tokenizer import SubwordTokenizer

log = logging.getLogger("codistill.trainer")


class TrainerError(RuntimeError):
    """The trainer cannot start or continue (bad version, mismatched checkpoint, ...)."""


def resolve_version(store: Store, cfg: OnlineTrainerConfig, retry: Retry,
                    from_checkpoint: str | None) -> str:
    """The teacher version this trainer distils from.

    Parameters
    ----------
    store
        The label store.
    cfg
        The trainer config (``name``, ``teacher_version``).
    retry
        The trainer's retry function.
    from_checkpoint
        The version of the trainer's latest checkpoint, if any: it wins, and a
        different ``cfg.teacher_version`` is an error.

    Returns
    -------
    str
        A version the store knows and holds completely.

    Raises
    ------
    TrainerError
        When the version conflicts with the checkpoint's, is unknown or incomplete.
    """
    requested = cfg.teacher_version
    if from_checkpoint is not None:
        if requested and requested != from_checkpoint:
            raise TrainerError(
                f"the checkpoints of trainer {cfg.name!r} distil from {from_checkpoint!r}, "
                f"not {requested!r}; use another trainer name to switch teacher"
            )
        version = from_checkpoint
    else:
        version = requested or retry("store", "current", store.current)
        if version is None:
            raise TrainerError(f"{store.describe()} has no current teacher version: "
                               "precompute one first (codistill teacher precompute)")
    info = retry("store", "get_version", lambda: store.get_version(version))
    if info is None:
        raise TrainerError(f"teacher version {version!r} is unknown to {store.describe()}")
    if info.status != "complete":
        raise TrainerError(f"teacher version {version!r} is {info.status!r}, not complete: "
                           "refusing to distil from a half-written version")
    return version


def candidate_source(store: Store, version: str, retry: Retry) -> StoreCandidates:
    """Teacher vectors of its version for query-only students, read with retry.

    Parameters
    ----------
    store
        The store holding the version's candidate embeddings.
    version
        The trainer's teacher version.
    retry
        The trainer's retry function.

    Returns
    -------
    StoreCandidates
    """
    return StoreCandidates(store, version,
                           call=lambda fn: retry("store", "candidate embeddings", fn))


def new_student(store: Store, settings: Settings, cfg: OnlineTrainerConfig, version: str,
                retry: Retry, vocabulary_seq: int | None = None) -> Student:
    """The student a trainer without checkpoints starts from.

    Parameters
    ----------
    store
        The store (candidate texts, candidate vectors).
    settings
        For the train split (``vocab_from_data``).
    cfg
        ``init_student`` (warm start) or the architecture of a new ``BowStudent``.
    version
        The trainer's teacher version.
    retry
        The trainer's retry function.
    vocabulary_seq
        The store sequence a fresh vocabulary is fitted under (:func:`vocabulary_texts`).

    Returns
    -------
    Student
        A warm start relabelled to ``version``, or a fresh ``BowStudent`` (seeded
        with ``cfg.seed``).

    Raises
    ------
    TrainerError
        When a query-only warm start was built on another teacher version (its
        query space would not match the stored vectors), or there is no text to
        fit a vocabulary on.
    """
    if cfg.init_student is not None:
        student = Student.load(cfg.init_student,
                               candidate_source=candidate_source(store, version, retry))
        if student.teacher_version != version and not student.has_candidate_tower:
            raise TrainerError(
                f"warm start {cfg.init_student} scores against the candidate embeddings of "
                f"teacher {student.teacher_version}; this trainer distils from "
                f"{version}, whose vectors live in another space. Distil a new "
                "student from that version first.")
        if student.teacher_version != version:
            log.warning("warm start %s was built on teacher %s; it now distils from %s",
                        cfg.init_student, student.teacher_version, version)
            student.teacher_version = version
        return student
    texts = vocabulary_texts(store, settings, cfg, version, retry, vocabulary_seq)
    tokenizer = SubwordTokenizer(cfg.max_vocab, cfg.oov_buckets).fit(texts)
    torch.manual_seed(cfg.seed)
    return BowStudent(tokenizer, version, BowConfig(dim=cfg.dim, out_dim=cfg.out_dim),
                      query_max_len=cfg.query_max_len,
                      candidate_max_len=cfg.candidate_max_len)


def vocabulary_seq(cfg: OnlineTrainerConfig, plan: PlanLog, keeper: Any) -> int | None:
    """The store sequence a fresh trainer fits its vocabulary under, recorded in its plan.

    The replayed plan's record first, else this trainer's own (a restart before the
    first checkpoint reads it back), else the version's sequence now, written down
    before the fit: a labeller appending candidates in between then changes nothing.
    None for a warm start (no vocabulary is fitted). ``keeper``: the trainer's
    :class:`~student.online.keeper.VersionKeeper`.
    """
    if cfg.init_student is not None:
        return None
    plans = [PlanLog(cfg.replay_plan)] if cfg.replay_plan is not None else []
    for log_ in [*plans, plan]:
        if (seq := log_.vocabulary_seq()) is not None:
            break
    else:
        seq = keeper.sequence("before fitting a fresh student's vocabulary")
    plan.write_vocabulary_seq(seq)
    return seq


def vocabulary_texts(store: Store, settings: Settings, cfg: OnlineTrainerConfig, version: str,
                     retry: Retry, max_seq: int | None = None) -> list[str]:
    """Candidate texts of its version (+ train-split queries when available).

    Parameters
    ----------
    store, settings, cfg, version, retry
        As for :func:`new_student`.
    max_seq
        Only candidates appended at or before this store sequence (the one the trainer
        recorded for its vocabulary), so a replay fits on the same texts however many
        a labeller added since; None: every candidate.

    Returns
    -------
    list[str]
        The texts to fit the student's subword vocabulary on.
    """
    ids = retry("store", "candidate ids", lambda: sorted(store.iter_candidate_ids(version)))
    if max_seq is not None and ids:
        mask = retry("store", "has_embeddings",
                     lambda: store.has_embeddings(version, ids, max_seq=max_seq))
        ids = [c for c, ok in zip(ids, mask, strict=True) if ok]
    texts: list[str] = []
    for i in range(0, len(ids), 4096):
        chunk = ids[i : i + 4096]
        texts += [t for t in retry("store", "texts", lambda c=chunk: store.get_texts(c)) if t]
    train = settings.data_dir / "train.jsonl"
    if cfg.vocab_from_data and train.exists():
        from codistill.ranking import read_ranking_file

        texts += [ex.query for ex in read_ranking_file(train)]
    if not texts:
        raise TrainerError(f"no candidate texts for {version!r}: cannot fit a vocabulary")
    return texts


def export_student(student: Student, out: str | Path, trainer_meta: dict[str, Any]) -> Path:
    """Replace the directory ``out`` with ``student`` (a normal loadable student directory).

    The student is written next to ``out`` and renamed into place, with
    ``trainer.json`` (``trainer_meta``) beside its files; leftovers of a process
    killed half-way are removed first.

    Parameters
    ----------
    student
        The model to save.
    out
        The final directory.
    trainer_meta
        JSON-ready facts about the run that produced it.

    Returns
    -------
    Path
        ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*-*"):  # left by a process killed here
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    student.save(tmp)
    write_synced(tmp / "trainer.json", json.dumps(trainer_meta, indent=1))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    publish_dir(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
