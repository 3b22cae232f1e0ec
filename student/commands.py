"""``codistill student ...``: distil, evaluate and list students.

Mounted into the main CLI as ``app.add_typer(student_app, name="student")``. The
root CLI's helpers (``settings()``, ``progress()``, ``_fail``, consoles) are
imported inside each command: ``codistill.cli`` imports this module while it is
still being defined, and the module stays light (no torch) so ``--help`` is fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

student_app = typer.Typer(help="Students: offline distillation from the store, evaluation.",
                          no_args_is_help=True)


def _root() -> Any:
    from codistill import cli

    return cli


@student_app.command("distill")
def student_distill(
    epochs: Annotated[int | None, typer.Option(help="epoch budget (default 10)")] = None,
    time_budget: Annotated[float | None, typer.Option(help="seconds for the training loop")] = None,
    alpha: Annotated[float | None, typer.Option(help="KD weight; 1 - alpha on hard labels")] = None,
    temperature: Annotated[float | None, typer.Option(help="KD temperature")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    student: Annotated[str | None, typer.Option(
        help="asym-bow (default: query tower vs the teacher's stored candidate vectors) or bow")] = None,
    init: Annotated[str | None, typer.Option(
        help="teacher (default: subword table from the teacher) or random")] = None,
    current: Annotated[bool, typer.Option(help="make the new student current")] = True,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="write the summary")] = None,
) -> None:
    """Warm-start a student from the train split's soft labels of the store's current teacher."""
    from stores.base import StoreError
    from student.distill import DistillConfig, distill, results_table

    root = _root()
    given = {"epochs": epochs, "time_budget_s": time_budget, "alpha": alpha,
             "temperature": temperature, "seed": seed, "student": student, "init": init}
    try:
        cfg = DistillConfig(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise root._fail(exc) from None
    s = root.settings()
    try:
        summary = distill(s, cfg, root.progress(), set_current=current)
    except (FileNotFoundError, LookupError, StoreError) as exc:
        raise root._fail(exc) from None
    root.out.print(results_table(summary))
    root.out.print(f"saved {summary['student_version']} to {summary['path']}"
                   + (" (current)" if current else ""))
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2))


@student_app.command("evaluate")
def student_evaluate(
    data: Annotated[list[Path], typer.Option(help="ranking JSONL file(s)")],
    student: Annotated[str | None, typer.Option(help="'current' (default) or a version")] = None,
    bm25: Annotated[bool, typer.Option(help="also evaluate BM25 on the same lists")] = True,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="write the metrics")] = None,
) -> None:
    """MRR@10 / NDCG@10 / Recall@k of a saved student on any ranking file."""
    from codistill.ranking import RankingFileError, read_ranking_file
    from stores.base import StoreError
    from student.asym import StoreCandidates
    from student.base import needs_candidate_source
    from student.registry import StudentIntegrityError, student_registry

    root = _root()
    s = root.settings()
    reg = student_registry(s.home)
    store = None
    try:
        version = reg.resolve(student)
        card = reg.load_card(version)
        source = None
        if needs_candidate_source(card.kind):  # candidates come from the teacher's vectors
            from stores import open_configured_store

            store = open_configured_store(s)
            source = StoreCandidates(store, card.teacher_version)
        model = reg.load(version, candidate_source=source)
        sets = {str(p): read_ranking_file(p) for p in data}
        results = _evaluate_sets(root, model, version, sets, bm25)
    except (FileNotFoundError, RankingFileError, StudentIntegrityError, ValueError, KeyError,
            StoreError) as exc:
        raise root._fail(exc) from None
    finally:
        if store is not None:
            store.close()
    if json_out:
        json_out.write_text(json.dumps({"student_version": version, "results": results}, indent=2))


def _evaluate_sets(root: Any, model: Any, version: str, sets: dict[str, Any], bm25: bool
                   ) -> dict[str, dict[str, dict[str, float]]]:
    from student.baselines import evaluate_bm25
    from student.distill import evaluate_student

    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, examples in sets.items():
        rows = {f"student {version}": evaluate_student(model, examples)}
        if bm25:
            rows["bm25"] = evaluate_bm25(examples)
        root.out.print(root.metrics_table(name, rows))
        results[name] = rows
    return results


@student_app.command("list")
def student_list() -> None:
    """Saved students (current starred) with their teacher, size and held-out MRR@10."""
    from rich.table import Table

    from student.registry import student_registry

    root = _root()
    reg = student_registry(root.settings().home)
    current = reg.current_version()
    table = Table("version", "teacher", "MB", "epochs", "MRR@10", "created")
    for v in reg.versions():
        card = reg.load_card(v)
        mrr = ", ".join(f"{k.split('@')[0]} {m['mrr@10']:.3f}" for k, m in card.metrics.items())
        table.add_row(("* " if v == current else "  ") + v, card.teacher_version,
                      f"{card.size.get('megabytes', 0):.1f}", str(card.train.get("epochs_run", "")),
                      mrr, card.created_at[:19])
    root.out.print(table)


# ---------------------------------------------------------------- online
@student_app.command("online")
def student_online(
    name: Annotated[str, typer.Option(help="trainer identity: checkpoints, pin, consumer group")] = "default",
    batch_size: Annotated[int, typer.Option(help="records per batch per partition")] = 64,
    checkpoint_every: Annotated[int, typer.Option(help="batches between checkpoints")] = 10,
    alpha: Annotated[float, typer.Option(help="KD weight; 1 - alpha on click feedback")] = 0.5,
    lr: Annotated[float, typer.Option(help="3e-3 from scratch; ~1e-4 for a warm start")] = 3e-3,
    until_end: Annotated[bool, typer.Option(help="stop at the end of the log seen at start")] = False,
    max_batches: Annotated[int | None, typer.Option(help="stop after this many batches")] = None,
    init_student: Annotated[Path | None, typer.Option(help="warm start from a student folder")] = None,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port (0 = off)")] = 0,
) -> None:
    """Train the student continuously from the events topic (single writer, exactly once)."""
    from stores.base import StoreError
    from student.online import OnlineTrainerConfig, run_online

    root = _root()
    cfg = OnlineTrainerConfig(name=name, batch_size=batch_size, checkpoint_every=checkpoint_every,
                              alpha=alpha, lr=lr, until_end=until_end, max_batches=max_batches,
                              init_student=init_student, metrics_port=metrics_port)
    try:
        summary = run_online(root.settings(), cfg)
    except (StoreError, LookupError, FileNotFoundError, ValueError) as exc:
        raise root._fail(exc) from None
    root.out.print_json(json.dumps(summary, default=str))
