"""The main job on embedded defaults: every stage of the offline half, timed.

data build -> zero-shot teacher evaluation -> fine-tune (promotion gate) ->
evaluation of the current teacher -> precompute candidate embeddings and soft
labels for train, valid and test -> distil the student from the train labels ->
online training over a seeded event stream. Writes ``HOME/demo_summary.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

from codistill.config import Settings
from codistill.fsio import atomic_write_text


class StepTimer:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.steps: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.console.rule(f"[bold]{name}")
        start = time.perf_counter()
        yield
        self.steps[name] = time.perf_counter() - start
        self.console.print(f"[dim]{name}: {self.steps[name]:.1f}s")

    def table(self) -> Table:
        table = Table("step", "seconds", title="time per step")
        for name, sec in self.steps.items():
            table.add_row(name, f"{sec:.1f}")
        table.add_row("[bold]total", f"[bold]{sum(self.steps.values()):.1f}")
        return table


def run_demo(settings: Settings, progress: bool = True, train: bool = True,
             console: Console | None = None, student: bool = True) -> dict[str, Any]:
    from codistill.console import metrics_table
    from tasks import dataset as ds
    from tasks.build import build_dataset
    from teacher import workflow as wf

    console = console or Console()
    timer = StepTimer(console)
    summary: dict[str, Any] = {"size": settings.data.size, "home": str(settings.home)}

    with timer.step("build data"):
        manifest = build_dataset(settings.data, settings.data_dir, settings.download_dir, progress=progress)
        summary["data"] = {"data_hash": manifest["data_hash"], "counts": manifest["counts"]}
        console.print(json.dumps(manifest["counts"]))
    splits = {sp: ds.read_split(settings, sp) for sp in ds.SPLITS}

    def evaluate(version: str) -> dict[str, dict[str, float]]:
        teacher = wf.open_teacher(settings, version, progress)
        return {sp: wf.evaluate_version(settings, version, splits[sp], ds.metric_label(settings, sp),
                                        progress, teacher) for sp in ("valid", "test")}

    zs_version = wf.zero_shot_version(settings)
    summary["teacher_choice"] = note = teacher_note(settings, train)
    console.print(note)
    with timer.step("evaluate zero-shot teacher"):
        summary["zero_shot"] = {"teacher_version": zs_version, **evaluate(zs_version)}
        console.print(metrics_table(f"zero-shot {zs_version}", _splits_only(summary["zero_shot"])))

    if train:
        wf.ensure_current(settings)
        with timer.step("fine-tune teacher"):
            summary["train"] = wf.train_and_promote(settings, progress)
            t = summary["train"]
            console.print(f"candidate {t['candidate']}: valid MRR@10 {t['valid_mrr@10_candidate']:.4f} "
                          f"vs {t['valid_mrr@10_previous']:.4f} -> "
                          f"{'promoted' if t['promoted'] else 'not promoted, kept ' + t['current']}"
                          f" (gate: {t['gate']['reason']})")
        current = wf.ensure_current(settings)
        with timer.step("evaluate current teacher"):
            summary["current"] = {"teacher_version": current, **evaluate(current)}
            console.print(metrics_table(f"current {current}", _splits_only(summary["current"])))
    else:
        current = wf.ensure_current(settings)

    with timer.step("precompute embeddings + soft labels"):
        stats = wf.precompute_version(settings, current, wf.precompute_sets(settings), progress)
        summary["precompute"] = {"teacher_version": current, "seconds": stats.seconds,
                                 **stats.per_split, **stats.rates()}
        console.print(f"store: {stats.candidates_total} candidates, {stats.queries_total} queries "
                      f"({stats.rates()['candidates_per_s']:.0f} candidates/s)")

    if student:
        from codistill.app import online_demo
        from student.distill import distill, results_table

        with timer.step("distill student (offline warm start)"):
            summary["distill"] = distill(settings, settings.distill, progress)
            console.print(results_table(summary["distill"]))
        student_dir = summary["distill"]["path"]
        with timer.step("online training over a seeded event stream"):
            summary["online"] = online_demo.demo_step(settings, student_dir, progress)
            tr = summary["online"]["trainer"]
            console.print(f"online: {tr['events_this_run']} events in {tr['batches']} batches "
                          f"({tr['events_per_s']:.0f} events/s), counters {tr['counters']}; "
                          f"test MRR@10 {summary['online']['test']['mrr@10']:.4f}")

    summary["seconds"] = dict(timer.steps)
    console.print(timer.table())
    path = settings.home / "demo_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(summary, indent=2, default=str))
    console.print(f"summary written to {path}")
    return summary


def teacher_note(settings: Settings, train: bool) -> str:
    """Which teacher the demo runs, and why that one (printed and kept in the summary)."""
    t, r = settings.teacher, settings.teacher.train
    plan = (f", then fine-tuned ({r.max_steps} steps of {r.batch_size} queries, top "
            f"{r.train_layers or 'all'} layers, {r.max_seq_length} tokens, lr {r.lr:g}); the fine-tune "
            f"becomes current only if the promotion gate ({t.gate.mode}) accepts it on valid and "
            "every guard set" if train else " (no fine-tune: --skip-train)")
    return (f"teacher: {t.model} zero-shot at {t.max_seq_length} tokens{plan}. Why this teacher: "
            "it keeps the demo within its 15-minute budget on 2 cores; `python benchmarks/teacher.py` "
            "compares MiniLM and mpnet at 128-384 tokens, zero-shot and fine-tuned, and names the "
            "best teacher the gate accepts (README, Results; set teacher.model and "
            "teacher.max_seq_length to use it).")


def _splits_only(d: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {k: v for k, v in d.items() if isinstance(v, dict)}

