"""A seeded event stream for the demo: impressions and position-biased clicks over the
train split's queries, produced into the configured event log, then consumed by the
online trainer (warm-started from the distilled student when there is one)."""

from __future__ import annotations

from typing import Any

from codistill import metrics
from codistill.config import Settings
from streaming import open_stream
from streaming.generator import ClickModel, QuerySpec, generate_stream

WARM_START_LR = 1e-4


def produce_demo_stream(settings: Settings, n_requests: int = 1500, seed: int = 0,
                        malformed_rate: float = 0.02) -> dict[str, int]:
    """Write a seeded stream (with a few malformed messages for the DLQ) to the events topic."""
    from tasks.dataset import read_split

    train = read_split(settings, "train")
    specs = [QuerySpec(ex.query_id, ex.query, ex.candidate_ids, [float(x) for x in ex.labels])
             for ex in train]
    gen = generate_stream(specs, n_requests, seed, click_model=ClickModel(eta=1.0), max_shown=10,
                          malformed_rate=malformed_rate)
    stream = open_stream(settings.resolved_stream())
    try:
        stream.ensure_topics()
        for m in gen.messages:
            stream.send(settings.stream.topic, m.key, m.value)
        stream.flush()
    finally:
        stream.close()
    return dict(gen.counts)


def demo_step(settings: Settings, init_student: str | None, progress: bool = True,
              **overrides: Any) -> dict[str, Any]:
    """Produce the seeded stream, train online until its end, evaluate on the test split.

    The trainer runs with the ``online`` settings section, the demo's recipe (name
    ``demo``, until the end of the stream, the warm start at ``WARM_START_LR``) and
    ``overrides`` (``OnlineTrainerConfig`` fields) on top.
    """
    import shutil

    from codistill.config import OnlineTrainerConfig
    from stores import open_configured_store
    from student.asym import StoreCandidates
    from student.base import Student
    from student.online import run_online
    from tasks.dataset import read_split

    stream_cfg = settings.resolved_stream()
    # a warm start is already near the teacher: the from-scratch lr walks it away, so the
    # demo replays its train-query stream at WARM_START_LR and can only hold its quality
    recipe = {"name": "demo", "until_end": True, "init_student": init_student,
              "lr": WARM_START_LR if init_student else settings.online.lr}
    cfg = OnlineTrainerConfig.model_validate({**settings.online.model_dump(), **recipe,
                                              **overrides})
    if stream_cfg.backend == "embedded" and stream_cfg.path is not None:
        # a re-run starts over: a fresh log, and no checkpoint of another teacher to resume
        shutil.rmtree(stream_cfg.path, ignore_errors=True)
        shutil.rmtree(settings.home / "online" / cfg.name, ignore_errors=True)
    produced = produce_demo_stream(settings)
    summary = run_online(settings, cfg)
    test = read_split(settings, "test")
    store = open_configured_store(settings)
    try:  # a query-only student scores against the teacher's stored candidate vectors
        student = Student.load(summary["student_dir"], candidate_source=StoreCandidates(
            store, summary["teacher_version"]))
        scores = [student.score(ex.query, ex.candidates, candidate_ids=ex.candidate_ids)
                  for ex in test]
    finally:
        store.close()
    return {"produced": produced, "trainer": summary,
            "test": metrics.evaluate(scores, [ex.labels for ex in test])}
