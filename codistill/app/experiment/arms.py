"""The arms of the online experiment: rankers that may learn from their own impressions.

Every arm implements the simulator's ``Ranker`` (``rank(example)``, ``version``) and
``observe(interaction)``, called with each impression it served and the clicks on it,
*after* the impression was scored (progressive validation). Frozen arms ignore it;
a :class:`LearningArm` buffers ``batch_size`` joined impressions and takes one
:class:`~student.online.learner.OnlineLearner` step on them, exactly the step the online
trainer takes on a joined batch (same batching, same loss), so what the experiment
measures is what the trainer does, without the stream and the store around it.

The teacher's view of the online split (:class:`TeacherView`) is what the nearline
labeller writes: one embedding per query and per candidate, so the KD target of any
list a query was shown with is ``scale * cos(query, candidates)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from codistill.ids import candidate_id
from codistill.ranking import RankingExample
from codistill.text import BM25Ranker
from stores.base import SoftLabelRecord
from streaming.join import JoinedImpression
from streaming.simulator import Interaction
from student.base import Student
from student.online.learner import JoinedBatch, OnlineLearner


@dataclass
class TeacherView:
    """The teacher's embeddings of queries and candidates (L2-normalised), by id.

    Parameters
    ----------
    version
        The teacher version that wrote them.
    scale
        Its logit scale: logits are ``scale * cosine``.
    queries, candidates
        Query id / candidate id -> float32 ``[d]`` unit vector.
    """

    version: str
    scale: float
    queries: dict[str, np.ndarray] = field(default_factory=dict)
    candidates: dict[str, np.ndarray] = field(default_factory=dict)

    def cosines(self, example: RankingExample) -> np.ndarray:
        q = self.queries[example.query_id]
        c = np.stack([self.candidates[i] for i in example.candidate_ids])
        return (c @ q).astype(np.float32)

    def label(self, example: RankingExample) -> SoftLabelRecord:
        """The soft-label record of ``example``'s whole list (one per query serves every list)."""
        return SoftLabelRecord(query_id=example.query_id, teacher_version=self.version,
                               candidate_ids=list(example.candidate_ids),
                               scores=self.cosines(example),
                               query_embedding=self.queries[example.query_id],
                               logit_scale=self.scale)


class MemoryCandidates:
    """An ``IdCandidateSource`` over :attr:`TeacherView.candidates` (no store round trip)."""

    def __init__(self, vectors: Mapping[str, np.ndarray]) -> None:
        self.vectors = vectors

    def embed_ids(self, ids: Sequence[str]) -> Tensor:
        return torch.from_numpy(np.stack([self.vectors[i] for i in ids]).astype(np.float32))

    def embed(self, texts: Sequence[str]) -> Tensor:
        return self.embed_ids([candidate_id(t) for t in texts])


def _order(scores: np.ndarray) -> list[int]:
    """Best first; ties keep list order (the metrics' rule)."""
    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]


class Arm:
    """A frozen ranker: ``observe`` does nothing."""

    name: str = "arm"
    learns: bool = False

    @property
    def version(self) -> str:
        return self.name

    def scores(self, example: RankingExample) -> np.ndarray:
        raise NotImplementedError

    def rank(self, example: RankingExample) -> Sequence[int]:
        return _order(self.scores(example))

    def observe(self, interaction: Interaction) -> None:
        """Frozen: nothing to learn."""

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "learns": self.learns}


class TeacherArm(Arm):
    """The frozen teacher: ``cos(query, candidate)`` from the labeller's embeddings."""

    def __init__(self, view: TeacherView, name: str = "teacher") -> None:
        self.view, self.name = view, name

    def scores(self, example: RankingExample) -> np.ndarray:
        return self.view.cosines(example)


class BM25Arm(Arm):
    """BM25 over each list (IDF over every candidate of the online split): the floor."""

    def __init__(self, examples: Sequence[RankingExample], name: str = "bm25") -> None:
        self.ranker, self.name = BM25Ranker([c for ex in examples for c in ex.candidates]), name

    def scores(self, example: RankingExample) -> np.ndarray:
        return self.ranker.scores(example.query, example.candidates)


class StudentArm(Arm):
    """A student ranking by its own logits; frozen unless it is a :class:`LearningArm`."""

    def __init__(self, student: Student, name: str) -> None:
        self.student, self.name = student, name
        self.student.eval()

    def scores(self, example: RankingExample) -> np.ndarray:
        return self.student.score(example.query, example.candidates, example.candidate_ids)


class LearningArm(StudentArm):
    """A student that learns from the impressions it served: one step per ``batch_size``.

    Parameters
    ----------
    student
        Its starting weights (a copy per arm: the arm trains it in place).
    name
        The arm's name (also the impressions' model version).
    learner
        The optimizer and loss: ``alpha`` 1 is KD only, 0 feedback only.
    view
        The teacher's labels; None for feedback only (the arm never sees one).
    batch_size
        Impressions per step.
    """

    learns = True

    def __init__(self, student: Student, name: str, learner: OnlineLearner,
                 view: TeacherView | None, examples: Mapping[str, RankingExample],
                 batch_size: int = 16) -> None:
        super().__init__(student, name)
        self.learner, self.view, self.examples = learner, view, examples
        self.batch_size = batch_size
        self.buffer: list[JoinedImpression] = []
        self.steps = self.skipped = self.impressions = self.clicks = 0
        self.losses: list[float] = []

    def observe(self, interaction: Interaction) -> None:
        self.impressions += 1
        self.clicks += len(interaction.feedback)
        self.buffer.append(JoinedImpression(interaction.impression, list(interaction.feedback)))
        if len(self.buffer) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Learn from the buffered impressions (one step, or none when nothing can teach)."""
        if not self.buffer:
            return
        ready, self.buffer = self.buffer, []
        labels: dict[str, SoftLabelRecord | None] = {}
        texts: dict[str, str | None] = {}
        for j in ready:
            ex = self.examples[j.impression.query_id]
            if self.view is not None:
                labels[ex.query_id] = self.view.label(ex)
            texts.update(zip(ex.candidate_ids, ex.candidates, strict=True))
        stats = self.learner.learn_many(JoinedBatch(ready, labels, texts))
        self.student.eval()
        if stats.stepped:
            self.steps += 1
            self.losses.append(float(stats.loss or 0.0))
        else:
            self.skipped += 1

    def summary(self) -> dict[str, Any]:
        last = self.losses[-50:]
        return {**super().summary(), "steps": self.steps, "skipped_batches": self.skipped,
                "impressions": self.impressions, "clicks": self.clicks,
                "alpha": self.learner.alpha, "batch_size": self.batch_size,
                "mean_loss_last_50": float(np.mean(last)) if last else None}
