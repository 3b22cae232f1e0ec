"""Teacher commands as functions of the settings (shared by the CLI, the demo and benchmarks)."""

from __future__ import annotations

import logging
from typing import Any

from codistill.config import Settings
from codistill.ranking import RankingExample
from stores import open_configured_store
from tasks.dataset import (
    SPLITS,
    built_guards,
    guard_label,
    manifest_data_hash,
    metric_label,
    read_guard,
    read_split,
)
from teacher.model import Teacher, TeacherRegistry, load_teacher
from teacher.precompute import PrecomputeStats, precompute
from teacher.train import finetune, make_triples, save_finetuned

log = logging.getLogger("codistill.teacher")

def teacher_registry(settings: Settings) -> TeacherRegistry:
    return TeacherRegistry(settings.teachers_dir, settings.home)


def zero_shot_version(settings: Settings, base: str | None = None) -> str:
    t = settings.teacher
    return teacher_registry(settings).zero_shot_card(
        base or t.model, t.logit_scale, t.max_seq_length
    ).teacher_version


def ensure_current(settings: Settings) -> str:
    """The current teacher version; the zero-shot pretrained teacher if none was promoted yet."""
    reg = teacher_registry(settings)
    current = reg.current_version()
    if current is None:
        current = zero_shot_version(settings)
        reg.set_current(current)
    return current


def resolve_version(settings: Settings, spec: str | None) -> str:
    """``None``/``current`` -> the current teacher; ``minilm``/``mpnet`` -> zero-shot; else a version."""
    from teacher.registry import known_teachers

    if spec in (None, "current"):
        return ensure_current(settings)
    if spec in known_teachers(settings.home):
        return zero_shot_version(settings, spec)
    teacher_registry(settings).load(spec)  # raises with the known versions listed
    return spec


def open_teacher(settings: Settings, version: str, progress: bool = True) -> Teacher:
    return load_teacher(
        teacher_registry(settings), version, settings.cache_dir,
        batch_size=settings.teacher.batch_size, progress=progress,
    )


def evaluate_version(
    settings: Settings, version: str, examples: list[RankingExample], label: str | None = None,
    progress: bool = True, teacher: Teacher | None = None,
) -> dict[str, float]:
    """Evaluate and, for named demo splits, remember the result on the teacher's card."""
    from teacher.evaluate import evaluate_teacher

    teacher = teacher or open_teacher(settings, version, progress)
    result = evaluate_teacher(teacher, examples)
    if label:
        reg = teacher_registry(settings)
        card = reg.load(version)
        card.metrics[label] = result
        reg.save(card)
    return result


def precompute_sets(settings: Settings) -> dict[str, list[RankingExample]]:
    """What ``teacher precompute`` writes by default: train, valid, test and every built
    guard set (``guard_<name>``), so students can be judged on the guards too."""
    sets = {sp: read_split(settings, sp) for sp in SPLITS}
    sets.update({f"guard_{n}": ex for n, (ex, _) in guard_sets(settings).items()})
    return sets


def guard_sets(settings: Settings) -> dict[str, tuple[list[RankingExample], str]]:
    """The built guard sets of the configured data (``data.guard_sets``), by name, with
    the card label their metrics are stored under."""
    return {name: (read_guard(settings, name), guard_label(settings, name))
            for name in built_guards(settings)}


def gate_sets(settings: Settings) -> dict[str, tuple[list[RankingExample], str]]:
    """What the promotion gate judges on: valid and every built guard set
    (``data.guard_sets``), each with the card label its metrics are stored under."""
    return {"valid": (read_split(settings, "valid"), metric_label(settings, "valid")),
            **guard_sets(settings)}


Judged = dict[str, tuple[dict[str, float], Any]]  # set -> (metrics, per-query MRR@10)


def judge_teacher(settings: Settings, teacher: Teacher,
                  sets: dict[str, tuple[list[RankingExample], str]]) -> Judged:
    """Metrics (remembered on the card of ``teacher.version``) and per-query MRR@10 per set."""
    from codistill import metrics
    from teacher.evaluate import score_examples

    reg = teacher_registry(settings)
    out = {}
    for name, (examples, label) in sets.items():
        scores = score_examples(teacher, examples)
        labels = [ex.labels for ex in examples]
        result = metrics.evaluate(scores, labels)
        card = reg.load(teacher.version)
        card.metrics[label] = result
        reg.save(card)
        out[name] = (result, metrics.per_query(scores, labels, ("mrr@10",))["mrr@10"])
    return out


def gate_and_promote(settings: Settings, candidate: str, incumbent: str, new: Judged,
                     old: Judged) -> dict[str, Any]:
    """Judge ``candidate`` against ``incumbent`` with the gate, on the same sets.

    The gate (:mod:`codistill.gate`, ``settings.teacher.gate``, superiority by default)
    compares per-query MRR@10 of candidate and incumbent on the same lists with a
    seeded paired bootstrap: on valid (superiority: the lower bound must be > 0;
    non-inferiority: > -tolerance) and on every built guard set (``data.guard_sets``;
    the bound must be > -tolerance), so a candidate that buys valid MRR with
    generalization is not promoted. The decision, listing every set, is stored on the
    candidate's card, which is kept (never made current) when it is rejected; the
    candidate becomes the current teacher iff the gate promotes it.
    """
    from codistill.gate import decide

    reg = teacher_registry(settings)
    decision = decide({name: (new[name][1], old[name][1]) for name in old},
                      settings.teacher.gate).to_json()
    card = reg.load(candidate)
    card.gate = decision
    reg.save(card)
    if decision["promote"]:
        reg.set_current(candidate)
    return {
        "previous": incumbent,
        "candidate": candidate,
        "promoted": decision["promote"],
        "current": reg.current_version(),
        "valid_mrr@10_previous": old["valid"][0]["mrr@10"],
        "valid_mrr@10_candidate": new["valid"][0]["mrr@10"],
        "guards": {name: {"mrr@10_previous": old[name][0]["mrr@10"],
                          "mrr@10_candidate": new[name][0]["mrr@10"]}
                   for name in old if name != "valid"},
        "gate": decision,
    }


def train_and_promote(settings: Settings, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the current teacher; promote the result only if the gate says it is
    better (:func:`gate_and_promote`, superiority by default: the valid lower bound must
    be > 0)."""
    reg = teacher_registry(settings)
    old_version = ensure_current(settings)
    train = read_split(settings, "train")
    sets = gate_sets(settings)
    teacher = open_teacher(settings, old_version, progress)
    old = judge_teacher(settings, teacher, sets)
    cfg = settings.teacher.train
    result = finetune(teacher, make_triples(train, cfg.hard_negatives, cfg.seed), cfg, progress)
    card = save_finetuned(teacher, reg, cfg, manifest_data_hash(settings), result)
    teacher.card = card  # the cache is keyed by version: evaluate as the new teacher
    new = judge_teacher(settings, teacher, sets)
    return {**gate_and_promote(settings, card.teacher_version, old_version, new, old),
            "train": result.summary()}


def promote_version(settings: Settings, spec: str, progress: bool = True,
                    force: bool = False) -> dict[str, Any]:
    """Promote a registered teacher (``minilm``, ``mpnet``, a ``teacher add`` name or a
    version id, resolved like ``teacher evaluate --teacher``) over the current one iff
    the gate says so (:func:`gate_and_promote`, the same rule as ``teacher train``);
    ``force`` (a rollback) makes it current whatever the gate decided (``forced``).

    Only the teacher registry's *current* pointer moves; the store keeps serving the
    old version until ``teacher precompute`` has written the new one completely.

    Raises
    ------
    ValueError
        When the candidate is the current teacher already.
    FileNotFoundError
        For an unknown version or data that was not built.
    """
    incumbent = ensure_current(settings)
    candidate = resolve_version(settings, spec)
    if candidate == incumbent:
        raise ValueError(f"{spec} is teacher {candidate}, the current teacher already: "
                         "nothing to promote (see `codistill teacher list`)")
    sets = gate_sets(settings)
    old = judge_teacher(settings, open_teacher(settings, incumbent, progress), sets)
    new = judge_teacher(settings, open_teacher(settings, candidate, progress), sets)
    result = gate_and_promote(settings, candidate, incumbent, new, old)
    result["forced"] = force and not result["promoted"]
    if result["forced"]:
        teacher_registry(settings).set_current(candidate)
        result["current"] = candidate
    return result


def precompute_version(
    settings: Settings, version: str, splits: dict[str, list[RankingExample]],
    progress: bool = True, make_current: bool = True,
) -> PrecomputeStats:
    teacher = open_teacher(settings, version, progress)
    store = open_configured_store(settings)
    try:
        return precompute(
            teacher, store, splits, settings.store.embedding_dtype,
            make_current=make_current, progress=progress,
        )
    finally:
        store.close()
