"""``codistill student online`` with bundle publishing: the trainer feeds the server.

The trainer lives in the student layer and knows nothing about serving; it calls a
hook after every checkpoint it has written and once at the end. This module (above
both) supplies the hook: :class:`BundlePublisher` saves the checkpoint's student in
the student registry and exports it as a checked serving bundle
(:func:`codistill.app.export.export_bundle`: onnx.checker, token and score parity,
valid metrics in the card, its teacher pinned), every ``publish_every`` batches and at
the end. A bundle that fails its checks is logged and counted, never published, and
never stops the trainer. The watcher (``serving.watcher``) then decides, through the
gate, whether the server promotes it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from codistill import console as cli
from codistill.config import Settings
from student.commands import _with_flags

log = logging.getLogger("codistill.publisher")


class BundlePublisher:
    """``on_checkpoint`` hook of the online trainer that publishes serving bundles.

    Parameters
    ----------
    settings : Settings
        The home (student registry, bundles, store).
    every : int
        Batches between bundles (published at the first checkpoint at least this
        many batches after the previous bundle), plus one at the end.
    """

    def __init__(self, settings: Settings, every: int) -> None:
        from stores import open_configured_store

        self.settings, self.every = settings, every
        self.store = open_configured_store(settings)
        self.last_batches = 0
        self.published: list[dict[str, Any]] = []
        self.failures = 0

    def __call__(self, checkpoint: Path, info: dict[str, Any]) -> None:
        batches = int(info["batches"])
        due = batches - self.last_batches >= self.every
        if not (due or (info.get("final") and batches > self.last_batches)):
            return
        from codistill.app.export import export_bundle
        from serving.bundle import BundleError
        from student.asym import StoreCandidates
        from student.base import Student, needs_candidate_source
        from student.registry import StudentCard, student_registry

        try:
            config = json.loads((checkpoint / "config.json").read_text())
            teacher = config["teacher_version"]
            source = (StoreCandidates(self.store, teacher)
                      if needs_candidate_source(config["kind"]) else None)
            model = Student.load(checkpoint, candidate_source=source)
            card = student_registry(self.settings.home).save(model, StudentCard(
                kind=model.kind, teacher_version=teacher, weights_sha256="",
                recipe={"online": info["trainer"]},
                train={"batches": batches, "checkpoint": checkpoint.name}))
            bundle = export_bundle(self.settings, self.store, card.student_version, source={
                "trainer": info["trainer"], "batches": batches, "checkpoint": checkpoint.name,
                "student_version": card.student_version})
        except (BundleError, OSError, ValueError, KeyError) as exc:
            self.failures += 1
            log.warning("bundle from %s not published: %s", checkpoint.name, exc)
            return
        self.last_batches = batches
        self.published.append({"bundle_version": bundle.bundle_version, "batches": batches,
                               "valid_mrr@10": bundle.metrics["valid (onnx)"]["mrr@10"]})
        log.info("published bundle %s at batch %d", bundle.bundle_version, batches)

    def close(self) -> None:
        self.store.close()


def student_online(
    name: Annotated[str | None, typer.Option(
        help="trainer identity: checkpoints, lease, consumer group (default 'default')")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="records per batch per partition (default 64)")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(
        help="batches between checkpoints (default 10)")] = None,
    alpha: Annotated[float | None, typer.Option(
        help="KD weight; 1 - alpha on click feedback (default 0.5)")] = None,
    lr: Annotated[float | None, typer.Option(
        help="default 3e-3 (from scratch); ~1e-4 for a warm start")] = None,
    until_end: Annotated[bool | None, typer.Option(
        help="stop at the end of the log seen at start")] = None,
    max_batches: Annotated[int | None, typer.Option(help="stop after this many batches")] = None,
    init_student: Annotated[Path | None, typer.Option(
        help="warm start from a student folder, or 'current': the registry's current "
        "student")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="Prometheus /metrics port (default 0 = off)")] = None,
    accept_changes: Annotated[bool, typer.Option(
        "--accept-changes", help="resume with other hyperparameters than the checkpoint's "
        "(lr, alpha, ...; never batch_size) as a new segment")] = False,
    start_from: Annotated[str | None, typer.Option(
        help="where a new trainer begins: earliest (the log start, default) or latest "
        "(the end: new traffic only)")] = None,
    accept_gap: Annotated[bool, typer.Option(
        "--accept-gap", help="resume although retention removed records past the "
        "checkpoint's offsets; the ledger records the gap")] = False,
    max_batch_wait_s: Annotated[float | None, typer.Option(
        help="live mode: apply a partition's waiting records as a partial batch after "
        "this many seconds; idle partitions' watermarks follow the others' (default off)")] = None,
    replay_plan: Annotated[Path | None, typer.Option(
        help="apply the entries of a trainer's plan (its checkpoints-plan folder) and "
        "stop: a fresh trainer replays that run")] = None,
    teacher_version: Annotated[str | None, typer.Option(
        help="the teacher version to distil from (default: the checkpoint's; a new trainer: "
        "the store's current); a trainer never changes version")] = None,
    publish_every: Annotated[int | None, typer.Option(
        help="publish a serving bundle (HOME/bundles) every N batches, at a checkpoint, "
        "and at the end (default: online.publish_every, off)")] = None,
) -> None:
    """Train the student continuously from the events topic (single writer, exactly once)."""
    from stores.base import StoreError
    from student.online import TrainerError, run_online
    from student.online.checkpoint import CheckpointError

    s = cli.settings()
    if init_student == Path("current") and not init_student.exists():
        from student.registry import student_registry

        reg = student_registry(s.home)
        try:
            init_student = reg.path(reg.resolve("current"))
        except (LookupError, FileNotFoundError, ValueError) as exc:
            raise cli.fail(exc) from None
    cfg = _with_flags(s.online, name=name, batch_size=batch_size,
                      checkpoint_every=checkpoint_every, alpha=alpha, lr=lr, until_end=until_end,
                      max_batches=max_batches, init_student=init_student,
                      metrics_port=metrics_port, accept_changes=accept_changes or None,
                      start_from=start_from, accept_gap=accept_gap or None,
                      max_batch_wait_s=max_batch_wait_s, replay_plan=replay_plan,
                      teacher_version=teacher_version, publish_every=publish_every)
    publisher = BundlePublisher(s, cfg.publish_every) if cfg.publish_every else None
    try:
        summary = run_online(s, cfg, on_checkpoint=publisher)
    except (StoreError, TrainerError, CheckpointError, LookupError, FileNotFoundError,
            ValueError) as exc:  # refused resumes and lost stores: one line, exit 2
        raise cli.fail(exc) from None
    if publisher is not None:
        summary["bundles"] = publisher.published
        publisher.close()
    cli.out.print_json(json.dumps(summary, default=str))


