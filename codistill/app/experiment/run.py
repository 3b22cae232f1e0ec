"""One seeded run of the online experiment: every arm on the same user stream.

For impression ``i`` every arm gets the *same* visit (query, active preference, true
grades, click randomness: common random numbers), ranks the list, is scored against
the true grades **before** it learns (progressive validation: NDCG@10 with the
preference's grade 1, reciprocal rank of the gold), then sees the clicks on what it
showed. Arms differ only in the ranker, so a difference between two curves is the
rankers' and not the users'.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codistill.app.experiment.arms import (
    Arm,
    BM25Arm,
    LearningArm,
    MemoryCandidates,
    StudentArm,
    TeacherArm,
    TeacherView,
)
from codistill.config import DistillConfig, ExperimentSettings
from codistill.ranking import RankingExample
from streaming.simulator import SimulatorConfig, UserStream, gold_rr, ndcg_at, simulate_one
from student.base import Student
from student.build import build_student
from student.online.learner import OnlineLearner

TEACHER, BM25, FROZEN = "teacher", "bm25", "student-frozen"
STARTS = ("distilled", "scratch")
OBJECTIVES = {"feedback": 0.0, "kd": 1.0, "kd+feedback": None}  # None: settings' alpha
ARMS: tuple[str, ...] = (TEACHER, BM25, FROZEN) + tuple(
    f"{start}/{obj}" for start in STARTS for obj in OBJECTIVES)


@dataclass
class Context:
    """What every run shares: the online lists, the teacher's view, the students' starts."""

    examples: list[RankingExample]
    view: TeacherView
    distilled: Student  # the frozen distilled student (deep-copied per learning arm)
    train: list[RankingExample]  # the vocabulary of a from-scratch student
    distill_cfg: DistillConfig

    @property
    def by_query(self) -> dict[str, RankingExample]:
        return {ex.query_id: ex for ex in self.examples}


@dataclass
class SeedRun:
    """Per arm, per impression: NDCG@10 and gold RR; which impressions were first-seen."""

    seed: int
    switch_after: int | None
    first_seen: np.ndarray  # bool [n]
    ndcg: dict[str, np.ndarray] = field(default_factory=dict)
    rr: dict[str, np.ndarray] = field(default_factory=dict)
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def simulator_config(cfg: ExperimentSettings, seed: int, **changes: Any) -> SimulatorConfig:
    """The simulator's settings for one seed (``changes``: e.g. another strength)."""
    fields = dict(seed=seed, click_model=cfg.click_model, strength=cfg.strength,
                  preference=cfg.preference, switch_to=cfg.switch_to,
                  switch_after=cfg.switch_after, depth=cfg.depth, propensity=cfg.propensity)
    fields.update(changes)
    return SimulatorConfig(**fields)


def build_arms(ctx: Context, cfg: ExperimentSettings, seed: int,
               names: Sequence[str] = ARMS) -> list[Arm]:
    """Fresh arms for one seed: every learning arm starts from its own copy."""
    source = MemoryCandidates(ctx.view.candidates)
    by_query = ctx.by_query
    arms: list[Arm] = []
    for name in names:
        if name == TEACHER:
            arms.append(TeacherArm(ctx.view))
        elif name == BM25:
            arms.append(BM25Arm(ctx.examples))
        elif name == FROZEN:
            arms.append(StudentArm(ctx.distilled, FROZEN))
        else:
            start, objective = name.split("/")
            if start not in STARTS or objective not in OBJECTIVES:
                raise ValueError(f"unknown arm {name!r}; known: {', '.join(ARMS)}")
            alpha = OBJECTIVES[objective]
            alpha = cfg.alpha if alpha is None else alpha
            if start == "distilled":
                shared = {id(ctx.distilled.candidate_source): ctx.distilled.candidate_source}
                student, lr = copy.deepcopy(ctx.distilled, shared), cfg.lr_distilled
            else:
                student, lr = _scratch(ctx, seed, source), cfg.lr_scratch
            learner = OnlineLearner(student, lr=lr, alpha=alpha, temperature=cfg.temperature)
            view = None if objective == "feedback" else ctx.view
            arms.append(LearningArm(student, name, learner, view, by_query, cfg.batch_size))
    return arms


def _scratch(ctx: Context, seed: int, source: MemoryCandidates) -> Student:
    """A student with random weights (no teacher in its start), the distilled one's shape."""
    cfg = ctx.distill_cfg.model_copy(update={"init": "random", "seed": seed})
    dim = int(next(iter(ctx.view.candidates.values())).shape[0])
    return build_student(ctx.train, ctx.view.version, cfg, init_scale=ctx.view.scale,
                         teacher_dim=dim, candidate_source=source)


def run_seed(ctx: Context, cfg: ExperimentSettings, seed: int, *,
             names: Sequence[str] = ARMS, impressions: int | None = None,
             sim_changes: dict[str, Any] | None = None,
             tick: Callable[[int], None] | None = None) -> SeedRun:
    """Every arm in ``names`` over ``impressions`` visits of the seed's user stream."""
    t0 = time.perf_counter()
    n = impressions or cfg.impressions
    sim = simulator_config(cfg, seed, **(sim_changes or {}))
    users = UserStream(ctx.examples, sim)
    arms = build_arms(ctx, cfg, seed, names)
    out = SeedRun(seed, sim.switch_after, np.zeros(n, dtype=bool),
                  {a.name: np.zeros(n) for a in arms}, {a.name: np.zeros(n) for a in arms})
    for i in range(n):
        visit = users.draw(i)
        out.first_seen[i] = visit.first_seen
        for arm in arms:
            inter = simulate_one(visit, arm, sim, request_id=f"{arm.name}-{seed}-{i}")
            out.ndcg[arm.name][i] = ndcg_at(inter.shown_grades, visit.grades, 10)
            out.rr[arm.name][i] = gold_rr(inter.shown_grades, 10)
            arm.observe(inter)
        if tick is not None:
            tick(1)
    for arm in arms:
        if isinstance(arm, LearningArm):
            arm.flush()
        out.arms[arm.name] = arm.summary()
    out.seconds = time.perf_counter() - t0
    return out
