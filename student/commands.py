"""``codistill student ...``: distil, evaluate, list and train students online.

The heavy modules (torch) are imported inside each command, so ``--help`` stays fast.
Every flag left out keeps the value of the ``distill`` / ``online`` settings sections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

from codistill import console as cli

M = TypeVar("M", bound=BaseModel)

student_app = typer.Typer(help="Students: offline distillation from the store, evaluation.",
                          no_args_is_help=True)


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
    from student.distill import distill, results_table

    s = cli.settings()
    cfg = _with_flags(s.distill, epochs=epochs, time_budget_s=time_budget, alpha=alpha,
                      temperature=temperature, seed=seed, student=student, init=init)
    try:
        summary = distill(s, cfg, cli.progress(), set_current=current)
    except (FileNotFoundError, LookupError, StoreError) as exc:
        raise cli.fail(exc) from None
    cli.out.print(results_table(summary))
    cli.out.print(f"saved {summary['student_version']} to {summary['path']}"
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

    s = cli.settings()
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
        results = _evaluate_sets(model, version, sets, bm25)
    except (FileNotFoundError, RankingFileError, StudentIntegrityError, ValueError, KeyError,
            StoreError) as exc:
        raise cli.fail(exc) from None
    finally:
        if store is not None:
            store.close()
    if json_out:
        json_out.write_text(json.dumps({"student_version": version, "results": results}, indent=2))


def _evaluate_sets(model: Any, version: str, sets: dict[str, Any], bm25: bool
                   ) -> dict[str, dict[str, dict[str, float]]]:
    from student.baselines import evaluate_bm25
    from student.distill import evaluate_student

    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, examples in sets.items():
        rows = {f"student {version}": evaluate_student(model, examples)}
        if bm25:
            rows["bm25"] = evaluate_bm25(examples)
        cli.out.print(cli.metrics_table(name, rows))
        results[name] = rows
    return results


@student_app.command("list")
def student_list() -> None:
    """Saved students (current starred) with their teacher, size and held-out MRR@10."""
    from rich.table import Table

    from student.registry import student_registry

    reg = student_registry(cli.settings().home)
    current = reg.current_version()
    table = Table("version", "teacher", "MB", "epochs", "MRR@10", "created")
    for v in reg.versions():
        card = reg.load_card(v)
        mrr = ", ".join(f"{k.split('@')[0]} {m['mrr@10']:.3f}" for k, m in card.metrics.items())
        table.add_row(("* " if v == current else "  ") + v, card.teacher_version,
                      f"{card.size.get('megabytes', 0):.1f}", str(card.train.get("epochs_run", "")),
                      mrr, card.created_at[:19])
    cli.out.print(table)


@student_app.command("delete")
def student_delete(
    version: Annotated[str, typer.Argument(help="a saved student version (see student list)")],
) -> None:
    """Delete a saved student and release its durable pin on its teacher version, which
    can then expire (store.ttl_s) once it is neither current, pinned nor leased. The
    current student is refused. A trainer warm-started from it is unaffected: it holds
    its own lease on its version while it runs."""
    from stores import open_configured_store
    from stores.base import StoreError
    from stores.commands import report_expiry
    from student.registry import student_registry

    s = cli.settings()
    try:
        with open_configured_store(s) as store:  # reachable before anything is removed
            card = student_registry(s.home).delete(version, lambda c: store.unpin(
                c.teacher_version, f"student:{c.student_version}"))
            cli.out.print(f"deleted student {version}; released its pin on teacher "
                          f"{card.teacher_version}")
            holds = [f"{h.kind} {h.owner}" for h in store.holds(card.teacher_version)]
            if holds:
                cli.out.print(f"{card.teacher_version} is still held: {', '.join(holds)}")
            report_expiry(store)
    except (FileNotFoundError, ValueError, StoreError) as exc:
        raise cli.fail(exc) from None


def _with_flags(section: M, **flags: Any) -> M:
    """``section`` with the flags that were given (not None) applied and validated again."""
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValueError as exc:
        raise cli.fail(exc) from None
