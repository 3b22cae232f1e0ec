"""``codistill experiment online``: prepare, label the online split, run the arms, report.

The home is prepared as the stack prepares it (data with the online split, the current
teacher's train/valid/test labels, a student distilled from them); the teacher then
labels the online split in-process, which is what the nearline labeller writes to the
store (one embedding per query and per candidate; cached, so a rerun encodes nothing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from codistill import console as cli
from codistill.app.machine import machine
from codistill.config import Settings

experiment_app = typer.Typer(help="Experiments on the closed loop.", no_args_is_help=True)
RESULTS = Path("benchmarks/results")
QUICK: dict[str, Any] = dict(seeds=2, impressions=160, switch_after=80, bin=40, strengths=[],
                             batch_size=8)


def build_context(settings: Settings, progress: bool = False, log: Any = print,
                  prepare: bool = True) -> Any:
    """Prepare the home and label the online split: the :class:`~.run.Context` of a run.

    ``prepare`` False takes the home as it is (its current teacher and student), for a
    home another job built; the online split must be in its data build.
    """
    import numpy as np

    from codistill.app.experiment.arms import MemoryCandidates, TeacherView
    from codistill.app.experiment.run import Context
    from codistill.app.stack import prepare_offline
    from student.base import Student
    from student.registry import student_registry
    from tasks.dataset import read_online, read_split
    from teacher import workflow as wf

    if prepare:
        info = prepare_offline(settings, progress, log)
    else:
        current = student_registry(settings.home).current_version()
        if current is None:
            raise ValueError(f"no current student in {settings.home}: run without --no-prepare")
        info = {"teacher_version": wf.ensure_current(settings), "student_version": current}
    examples = read_online(settings)
    teacher = wf.open_teacher(settings, info["teacher_version"], progress)
    log(f"labelling the online split with {teacher.version}: {len(examples)} queries")
    texts = {c: t for ex in examples for c, t in zip(ex.candidate_ids, ex.candidates,
                                                     strict=True)}
    q = teacher.encode([ex.query for ex in examples], desc="online queries")
    c = teacher.encode(list(texts.values()), desc="online candidates")
    view = TeacherView(teacher.version, float(teacher.logit_scale),
                       {ex.query_id: np.asarray(v) for ex, v in zip(examples, q, strict=True)},
                       dict(zip(texts, np.asarray(c), strict=True)))
    reg = student_registry(settings.home)
    student = reg.load(info["student_version"], expected_teacher_version=teacher.version,
                       candidate_source=MemoryCandidates(view.candidates))
    assert isinstance(student, Student)
    ctx = Context(examples, view, student, read_split(settings, "train"), settings.distill)
    return ctx, info


def run_experiment(settings: Settings, *, out: Path | None = None, progress: bool = True,
                   log: Any = print, prepare: bool = True, stack: bool = False
                   ) -> dict[str, Any]:
    """Every arm on ``experiment.seeds`` user streams (and the gain curve); JSON + PNG.

    ``stack``: the KD + feedback arm once more through Kafka, Redis, the labeller, the
    trainer and the server (:mod:`codistill.app.experiment.stack`), on the same users.
    """
    from rich.progress import Progress

    from codistill.app.experiment import report
    from codistill.app.experiment.run import ARMS, TEACHER, run_seed
    from codistill.fsio import atomic_write_text
    from tasks.dataset import manifest_data_hash

    cfg = settings.experiment
    t0 = time.monotonic()
    ctx, info = build_context(settings, progress, log, prepare)
    sweep_runs = len(cfg.strengths) * cfg.sweep_seeds * cfg.impressions
    total = cfg.seeds * cfg.impressions + sweep_runs
    runs = []
    with Progress(disable=not progress, console=cli.console) as bar:
        task = bar.add_task("impressions (all arms)", total=total)

        def tick(n: int) -> None:
            bar.advance(task, n)

        for seed in range(cfg.seeds):
            runs.append(run_seed(ctx, cfg, seed, tick=tick))
        sweep = []
        for strength in cfg.strengths:
            names = (TEACHER, "distilled/kd+feedback")
            pts = [run_seed(ctx, cfg, 1000 + seed, names=names, tick=tick,
                            sim_changes={"strength": strength})
                   for seed in range(cfg.sweep_seeds)]
            gains = [report._ratio(r.ndcg, names[1], TEACHER, report.phases(r)["after"])
                     for r in pts]
            sweep.append({"strength": strength, "gain_after_switch": report.interval(gains),
                          "per_seed": gains})
    stack_section = None
    if stack:
        from codistill.app.experiment.stack import STACK_ARM, run_stack

        stack_section = run_stack(settings, ctx, info, runs, log)
    result: dict[str, Any] = {
        "benchmark": "online-experiment",
        "config": {**cfg.model_dump(), "arms": list(ARMS) + ([STACK_ARM] if stack else [])},
        "scenario": scenario(cfg),
        "data": {"size": settings.data.size, "data_hash": manifest_data_hash(settings),
                 "online_queries": len(ctx.examples)},
        "teacher_version": info["teacher_version"], "student_version": info["student_version"],
        "machine": machine(),
        "phases": report.phase_table(runs),
        "phases_first_seen": report.phase_table(runs, first_seen=True),
        "targets": report.targets(runs),
        "targets_first_seen": report.targets(runs, first_seen=True),
        "first_seen_share": float(sum(r.first_seen.sum() for r in runs)
                                  / sum(len(r.first_seen) for r in runs)),
        "curves": {m: report.curves(runs, cfg.bin, m) for m in ("ndcg", "rr")},
        "curves_first_seen": {"ndcg": report.curves(runs, cfg.bin, "ndcg", first_seen=True)},
        "strength_sweep": sweep,
        "stack": stack_section,
        "arms": {r.seed: r.arms for r in runs},
        "seconds_per_seed": [round(r.seconds, 1) for r in runs],
        "seconds": round(time.monotonic() - t0, 1),
    }
    path = out or RESULTS / f"online-experiment{'' if cfg.click_model == 'pbm' else '-' + cfg.click_model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1, default=float) + "\n")
    result["png"] = str(report.plot(result, path.with_suffix(".png")))
    result["json"] = str(path)
    return result


def scenario(cfg: Any) -> str:
    """The users, in one sentence (printed, and quoted in the README)."""
    switch = (f"after {cfg.switch_after} impressions the preference changes to "
              f"'{cfg.switch_to}'" if cfg.switch_after else "no drift switch")
    return (f"users draw queries of the online split uniformly; gold is grade 2, negatives "
            f"matching '{cfg.preference}' grade 1 (<= 1/4 of a list's negatives, relevant "
            f"with probability {cfg.strength}); {cfg.click_model} clicks on the top "
            f"{cfg.depth}; {switch}")


def _table(result: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table("arm", "NDCG@10 before", "after", "MRR before", "after",
              title=f"online experiment ({result['config']['seeds']} seeds, mean ± 95% CI)")

    def fmt(ci: dict[str, Any]) -> str:
        if ci["mean"] is None:
            return "-"
        if ci["low"] is None:
            return f"{ci['mean']:.3f}"
        return f"{ci['mean']:.3f} ± {ci['high'] - ci['mean']:.3f}"

    for arm, row in result["phases"].items():
        t.add_row(arm, fmt(row["ndcg_before"]), fmt(row["ndcg_after"]), fmt(row["rr_before"]),
                  fmt(row["rr_after"]))
    cli.out.print(t)
    if (stack := result.get("stack")) is not None:
        agree = stack["agreement"]
        verdict = {True: "within", False: "outside", None: "not judged"}[agree["holds"]]
        cli.out.print(f"stack arm: {verdict} the in-process arm's 95% intervals "
                      f"({agree['bins_inside']}/{agree['bins']} curve bins inside; "
                      f"{stack['errors']} errors)")
    for name, tgt in result["targets"].items():
        verdict = {True: "holds", False: "does not hold", None: "reported"}[tgt["holds"]]
        mean = "-" if tgt["mean"] is None else f"{tgt['mean']:.3f}"
        cli.out.print(f"{name}: {mean} (target {tgt['target']}) -> {verdict}")


@experiment_app.command("online")
def online_command(
    quick: Annotated[bool, typer.Option(help="tiny run (CI): 2 seeds, 160 impressions")] = False,
    out: Annotated[Path | None, typer.Option(help="JSON path (PNG beside it); default "
                                                  "benchmarks/results/online-experiment*.json")
                   ] = None,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
    prepare: Annotated[bool, typer.Option(help="build data, teacher labels and the student "
                                                "first (skipped where done)")] = True,
    stack: Annotated[bool, typer.Option(help="also run the KD + feedback arm through Kafka "
                                             "(stream.bootstrap_servers), Redis "
                                             "(store.redis_url), the labeller, the trainer and "
                                             "the server")] = False,
) -> None:
    """Frozen teacher, frozen student, BM25 and six learning students on one user stream."""
    from codistill.app.processes import StageFailed

    s = cli.settings()
    if quick:
        s = s.model_copy(update={"experiment": s.experiment.model_copy(update=QUICK)})
    try:
        result = run_experiment(s, out=out, progress=progress, log=cli.console.print,
                                prepare=prepare, stack=stack)
    except (FileNotFoundError, ValueError, StageFailed) as exc:
        raise cli.fail(exc) from None
    _table(result)
    cli.out.print(f"wrote {result['json']} and {result['png']}")
