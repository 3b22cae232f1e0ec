"""Query-encoding speed of a student next to its teacher."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from codistill.config import Settings
from student.base import Student

log = logging.getLogger("codistill.student")


def measure_speed(
    settings: Settings, student: Student, version: str, queries: list[str]
) -> dict[str, Any]:
    """Query-encoding throughput (batched) and latency (one query) of student and teacher.

    Both sides score against precomputed candidate embeddings in serving, so the
    query side is the cost that matters. Each side is warmed up on 8 queries, then
    timed on all ``queries`` in one call (throughput) and on the first 32 one at a
    time (latency). The teacher is timed on its model directly (its embedding cache
    would answer these queries from disk); if it cannot be opened, only the student
    is reported.

    Parameters
    ----------
    settings : Settings
        Home and teacher settings (batch size) to open teacher ``version`` with.
    student : Student
        The student to time (``encode_queries`` under ``torch.inference_mode``).
    version : str
        The teacher version.
    queries : list of str
        Query texts, e.g. the test split's.

    Returns
    -------
    dict
        ``{"student": {"queries_per_s", "latency_ms"}}``, plus ``"teacher"`` (the same
        keys), ``"speedup_batch"`` and ``"speedup_latency"`` when the teacher was timed.
    """

    def timed(fn: Any, texts: list[str]) -> dict[str, float]:
        fn(texts[:8])  # warm-up
        t0 = time.perf_counter()
        fn(texts)
        batch_s = time.perf_counter() - t0
        single = texts[:32]
        t0 = time.perf_counter()
        for text in single:
            fn([text])
        one_s = (time.perf_counter() - t0) / len(single)
        return {"queries_per_s": len(texts) / batch_s, "latency_ms": 1000 * one_s}

    with torch.inference_mode():
        out: dict[str, Any] = {"student": timed(student.encode_queries, queries)}
    try:
        from teacher.workflow import open_teacher

        teacher = open_teacher(settings, version, progress=False)
        model = teacher.model
        out["teacher"] = timed(
            lambda t: model.encode(t, batch_size=settings.teacher.batch_size,
                                   show_progress_bar=False), queries)
    except Exception as exc:  # speed is a report, never a reason to fail a distillation
        log.warning("teacher speed not measured: %s", exc)
        return out
    out["speedup_batch"] = out["student"]["queries_per_s"] / out["teacher"]["queries_per_s"]
    out["speedup_latency"] = out["teacher"]["latency_ms"] / out["student"]["latency_ms"]
    return out
