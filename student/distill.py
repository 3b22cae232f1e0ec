"""Offline distillation: warm-start a student from the teacher's soft labels in the store.

The teacher's *scores* are what ``codistill teacher precompute`` left in the store
for the train split: per query, the raw cosine of every candidate (teacher logits =
``logit_scale * cosine``) and the query's embedding; per candidate, its embedding.
The teacher model runs only for the static start (``init="teacher"``: one encoding
per subword, ``student.static_init``, cached) and the speed report. ``distill``

1. opens the configured store and holds its *current* teacher version with a lease
   (``student:distilling-...``) while it works, so the labels are never expired under
   it and a killed run leaves nothing permanent;
2. reads the train / valid / test splits and their labels (``student.labels``);
3. builds a fresh student (``student.build.build_student``; ``asym-bow`` by default,
   scored against the teacher's stored candidate vectors, or the symmetric ``bow``)
   and trains it with ``student.training.fit`` on a ``student.trainset.TrainSet``;
4. evaluates it beside BM25 and the teacher (``student.evaluation``), saves it to the
   student registry, pins the version for it (``student:<version>``) and optionally
   makes it current;
5. times query encoding (``student.speed``) and returns a JSON-ready summary.

The loss is described in ``student.training``; measured results of every student
kind are in ``benchmarks/results/student-demo.json`` (``benchmarks/student.py``).

The names of the split modules are importable from here as well (``fit``,
``build_student``, ``TrainSet``, ``read_labels``, ``evaluate_student``, ...).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from codistill import metrics
from codistill.config import DistillConfig, Settings
from codistill.ranking import RankingExample
from stores.base import Store
from student.asym import StoreCandidates
from student.base import Student
from student.baselines import evaluate_bm25
from student.build import build_student
from student.evaluation import (
    EVAL_SPLITS,
    evaluate_student,
    share_kept,
    student_scores,
    teacher_kl,
    teacher_metrics_from_store,
)
from student.extra import ExtraQueries
from student.labels import LABEL_CHUNK, read_labels
from student.registry import StudentCard, student_registry
from student.speed import measure_speed
from student.training import fit
from student.trainset import BatchOut, TrainSet

__all__ = [
    "EVAL_SPLITS",
    "LABEL_CHUNK",
    "BatchOut",
    "DistillConfig",
    "TrainSet",
    "build_student",
    "distill",
    "evaluate_student",
    "fit",
    "measure_speed",
    "read_labels",
    "results_table",
    "share_kept",
    "student_scores",
    "teacher_kl",
    "teacher_metrics_from_store",
]

LEASE_SLACK_S = 600.0  # labels, evaluation and saving around the training budget


def distill(settings: Settings, cfg: DistillConfig | None = None, progress: bool = True,
            set_current: bool = True) -> dict[str, Any]:
    """Distil a student from the store's current teacher version, evaluate it, save it.

    Runs the steps of the module docstring with torch limited to ``cfg.threads``
    threads (restored afterwards).

    Parameters
    ----------
    settings : Settings
        Home, data, store and teacher settings.
    cfg : DistillConfig, optional
        The recipe; default ``settings.distill``.
    progress : bool, default True
        Show progress bars (teacher encoding, training).
    set_current : bool, default True
        Make the saved student the registry's current one.

    Returns
    -------
    dict
        JSON-ready summary: ``student_version``, ``teacher_version``, ``current``,
        ``path``, ``store``, ``data`` (sizes, data hash, vocabulary size), ``config``,
        ``train`` (``fit``'s result), ``results`` (``student`` / ``untrained`` /
        ``bm25`` / ``teacher`` x valid / test metrics), ``teacher_metrics_source``,
        ``share_of_teacher_mrr@10``, ``size``, ``speed`` (``measure_speed`` or None)
        and ``seconds`` per phase.

    Raises
    ------
    LookupError
        If the store has no current teacher version, labels or embeddings are
        missing, or ``init="teacher"`` and the teacher model is not in this home.
    """
    cfg = cfg if cfg is not None else settings.distill
    threads = torch.get_num_threads()
    if cfg.threads:  # see DistillConfig.threads
        torch.set_num_threads(cfg.threads)
    try:
        return _distill(settings, cfg, progress, set_current)
    finally:
        torch.set_num_threads(threads)


def _distill(settings: Settings, cfg: DistillConfig, progress: bool, set_current: bool
             ) -> dict[str, Any]:
    from stores import open_configured_store
    from tasks.dataset import manifest_data_hash, metric_label, read_split

    t_start = time.perf_counter()
    clock: dict[str, float] = {}
    store = open_configured_store(settings)
    try:
        version = store.current()
        if version is None:
            raise LookupError(
                f"the store ({store.describe()}) has no current teacher version: "
                "run `codistill teacher precompute` first"
            )
        info = store.get_version(version)
        if info is None:
            raise LookupError(f"{store.describe()}: current version {version} has no manifest")
        if cfg.embed_weight > 0 and cfg.out_dim not in (None, info.dim):
            raise ValueError(f"embed_weight needs out_dim = the teacher's dim ({info.dim})")
        # a lease, not a pin: a distillation killed half way must leave nothing permanent.
        # It spans the training budget plus slack for labels, evaluation and saving, and is
        # renewed once training is done.
        holding = f"student:distilling-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        lease_s = cfg.time_budget_s + LEASE_SLACK_S
        store.lease(version, holding, lease_s)
        try:
            splits = {sp: read_split(settings, sp) for sp in ("train", *EVAL_SPLITS)}
            records = read_labels(store, version, splits["train"])
            encode = _teacher_encoder(settings, version, progress) \
                if cfg.init == "teacher" or cfg.unlabeled else None
            student = build_student(splits["train"], version, cfg, init_scale=info.logit_scale,
                                    teacher_dim=info.dim,
                                    candidate_source=StoreCandidates(store, version),
                                    encode=encode if cfg.init == "teacher" else None)
            data = TrainSet(splits["train"], records, student.tokenizer, cfg)
            if cfg.embed_weight > 0 or not student.has_candidate_tower or cfg.code_queries \
                    or cfg.unlabeled:
                data.attach_candidate_embeddings(store, version)
            extra = _extra_queries(settings, cfg, data, student, info.logit_scale, encode)
            held_out = {sp: read_labels(store, version, splits[sp]) for sp in EVAL_SPLITS}

            def assess(sp: str) -> dict[str, float]:
                scores = student_scores(student, splits[sp])
                m = metrics.evaluate(scores, [ex.labels for ex in splits[sp]])
                m["teacher_kl"] = teacher_kl(scores, held_out[sp])
                return m

            # the same architecture before training: a pure lexical matcher (shared towers)
            untrained = {sp: assess(sp) for sp in EVAL_SPLITS}
            clock["prepare"] = time.perf_counter() - t_start

            train = fit(student, data, cfg, progress=progress, valid=splits["valid"], extra=extra)
            clock["train"] = train["seconds"]
            store.lease(version, holding, LEASE_SLACK_S)

            t0 = time.perf_counter()
            results: dict[str, dict[str, dict[str, float]]] = {
                "student": {}, "untrained": untrained, "bm25": {}, "teacher": {}}
            sources = {}
            for sp in EVAL_SPLITS:
                results["student"][sp] = assess(sp)
                results["bm25"][sp] = evaluate_bm25(splits[sp])
                results["teacher"][sp], sources[sp] = _teacher_metrics(
                    settings, store, version, sp, splits[sp])
            clock["evaluate"] = time.perf_counter() - t0
            kept = {sp: share_kept(results["student"][sp], results["teacher"][sp])
                    for sp in EVAL_SPLITS}
            size = student.size_report()

            reg = student_registry(settings.home)
            card = reg.save(student, StudentCard(
                kind=student.kind, teacher_version=version, weights_sha256="",
                recipe=cfg.recipe(), size=size, data_hash=manifest_data_hash(settings),
                train={k: v for k, v in train.items() if k != "history"},
                metrics={metric_label(settings, sp): m for sp, m in results["student"].items()},
            ))
            store.pin(version, f"student:{card.student_version}")
            if set_current:
                reg.set_current(card.student_version)
        finally:
            store.release(version, holding)
        speed = None
        if cfg.measure_speed:
            t0 = time.perf_counter()
            speed = measure_speed(settings, student, version,
                                  [ex.query for ex in splits["test"]])
            clock["speed"] = time.perf_counter() - t0
        store_name = store.describe()
    finally:
        store.close()
    clock["total"] = time.perf_counter() - t_start
    return {
        "student_version": card.student_version,
        "teacher_version": version,
        "current": set_current,
        "path": str(reg.path(card.student_version)),
        "store": store_name,
        "data": {"size": settings.data.size, "data_hash": manifest_data_hash(settings),
                 "train_queries": len(data), "train_candidates": len(data.candidate_ids),
                 "vocab_size": student.tokenizer.vocab_size},
        "config": cfg.model_dump(),
        "train": train,
        "results": results,
        "teacher_metrics_source": sources,
        "share_of_teacher_mrr@10": kept,
        "size": size,
        "speed": speed,
        "seconds": clock,
    }


def _teacher_metrics(
    settings: Settings, store: Store, version: str, split: str, examples: Sequence[RankingExample]
) -> tuple[dict[str, float], str]:
    """Card metrics when the teacher was evaluated on exactly this data, else from the store."""
    from tasks.dataset import metric_label
    from teacher.workflow import teacher_registry

    try:
        card = teacher_registry(settings).load(version)
        found = card.metrics.get(metric_label(settings, split))
    except FileNotFoundError:  # labels written by a teacher registered elsewhere
        found = None
    if found and int(found.get("n_queries", -1)) == len(examples):
        return dict(found), "card"
    return teacher_metrics_from_store(store, version, examples), "store"


def _extra_queries(settings: Settings, cfg: DistillConfig, data: TrainSet, student: Student,
                   scale: float, encode: Callable[[Sequence[str]], np.ndarray] | None,
                   ) -> ExtraQueries | None:
    """``cfg.code_queries`` (train candidates, stored vectors) + ``cfg.unlabeled`` mined texts
    (embedded by the teacher, cached) as one ``ExtraQueries`` set; None if neither."""
    from tasks.dataset import read_unlabeled

    texts: list[str] = []
    vectors: list[np.ndarray] = []
    if cfg.code_queries:
        texts += data.candidate_texts
        vectors.append(data.teacher_candidates.numpy())
    if cfg.unlabeled:
        mined = read_unlabeled(settings, cfg.unlabeled, cfg.unlabeled_kinds)
        assert encode is not None  # built with the teacher whenever cfg.unlabeled
        texts += mined
        vectors.append(np.asarray(encode(mined), dtype=np.float32))
    if not texts:
        return None
    return ExtraQueries(student.tokenizer, texts, np.concatenate(vectors), cfg.query_max_len,
                        scale)


def _teacher_encoder(settings: Settings, version: str, progress: bool
                     ) -> Callable[[Sequence[str]], np.ndarray]:
    """The teacher's cached ``encode`` for the static start, or a clear error."""
    from teacher.workflow import open_teacher

    try:
        teacher = open_teacher(settings, version, progress)
    except FileNotFoundError as exc:
        raise LookupError(
            f"init='teacher' needs the model of teacher {version} in this home's registry "
            f"({exc}); distil with init='random' to train from the stored labels alone"
        ) from exc
    return lambda texts: teacher.encode(list(texts), desc=f"teacher: {len(texts)} texts")


def results_table(summary: dict[str, Any]) -> Any:
    """Student / BM25 / teacher x valid / test as a ``rich`` table.

    Parameters
    ----------
    summary : dict
        What ``distill`` returned.

    Returns
    -------
    rich.table.Table
        MRR@10, NDCG@10 and share of the teacher's MRR@10 per split, for the student,
        the student before training, BM25 and the teacher; the speed-up in the caption.
    """
    from rich.table import Table

    res = summary["results"]
    size = summary["size"]
    table = Table(title=f"student {summary['student_version']} <- teacher "
                        f"{summary['teacher_version']} ({size['megabytes']:.1f} MB, "
                        f"{summary['train']['epochs_run']} epochs, "
                        f"{summary['train']['seconds']:.0f}s)")
    table.add_column("model")
    for sp in EVAL_SPLITS:
        table.add_column(f"{sp} MRR@10", justify="right")
        table.add_column(f"{sp} NDCG@10", justify="right")
        table.add_column(f"{sp} share of teacher MRR", justify="right")
    for name in ("student", "untrained", "bm25", "teacher"):
        cells = []
        for sp in EVAL_SPLITS:
            m, t = res[name][sp], res["teacher"][sp]
            cells += [f"{m['mrr@10']:.4f}", f"{m['ndcg@10']:.4f}", f"{share_kept(m, t):.1%}"]
        table.add_row("student before training" if name == "untrained" else name, *cells)
    speed = summary.get("speed") or {}
    if "speedup_batch" in speed:
        table.caption = (f"query encoding: student {speed['student']['queries_per_s']:.0f}/s, "
                         f"teacher {speed['teacher']['queries_per_s']:.0f}/s "
                         f"({speed['speedup_batch']:.0f}x batched, "
                         f"{speed['speedup_latency']:.0f}x one query)")
    return table
