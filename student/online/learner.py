"""The online learner: one student, its optimizer and its loss, one step per joined batch.

Everything the online trainer does around a step - reading offsets, joining,
fetching labels, checkpointing, committing, retrying - is I/O. The step itself
is not, and keeping it in one object with a small river-like surface
(``learn_many`` / ``score`` / ``state_dict``) lets it be used and tested
in-process with no stream, store or file: build a :class:`JoinedBatch` from joined
impressions, soft-label records and candidate texts, and learn from it.

The rules of a step (the same whether the trainer or a test drives it):

* the batch's tensors come from :func:`~student.online.batching.build_batch`
  (teacher logits aligned to the shown order, feedback-only rows, ...);
* no step when nothing in the batch can teach: no row, or no row for the part
  of the loss that has weight (``alpha`` > 0 needs teacher rows, ``alpha`` < 1
  clicked rows). The gradient would be zero, but an AdamW step would still move
  the weights (momentum, weight decay);
* gradients are clipped to ``max_grad_norm``; the teacher-student top-1
  agreement of the batch is measured before the step.

Counters, metrics and drift detection stay with the caller, fed from the returned
:class:`LearnStats`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from codistill.config import OnlineTrainerConfig
from stores.base import SoftLabelRecord
from streaming.join import JoinedImpression
from student.base import Student
from student.losses import IPWClickLoss, ListwiseKDLoss, OnlineLoss
from student.online.batching import BatchStats, build_batch, needed_ids, top1_agreement
from student.online.checkpoint import optimizer_join, optimizer_split

STUDENT_PREFIX = "student."
OPTIMIZER_PREFIX = "optimizer."


@dataclass
class JoinedBatch:
    """Joined impressions with what the store holds for them: the input of one step.

    Parameters
    ----------
    ready
        The joined impressions (impression + its feedback) released by the joiner.
    labels
        Soft-label record per query id (None: the teacher has no record for it).
    texts
        Candidate text per candidate id (None: the store has no text for it).
    embedded
        For a student without a candidate tower: whether its candidate source holds
        each candidate's vector (False: dropped from its rows like a text miss, and
        counted as ``embedding_misses``). None: not checked (a tower needs no vector).
    vectors
        The teacher's stored vectors of shown candidates a query's record does not list
        (their KD target is ``scale * cos(record.query_embedding, vector)``).
    """

    ready: list[JoinedImpression]
    labels: Mapping[str, SoftLabelRecord | None] = field(default_factory=dict)
    texts: Mapping[str, str | None] = field(default_factory=dict)
    embedded: Mapping[str, bool] | None = None
    vectors: Mapping[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def fetch(
        cls,
        ready: Sequence[JoinedImpression],
        get_labels: Callable[[list[str]], Sequence[SoftLabelRecord | None]],
        get_texts: Callable[[list[str]], Sequence[str | None]],
        has_embeddings: Callable[[list[str]], Sequence[bool]] | None = None,
        get_vectors: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> JoinedBatch:
        """Join ``ready`` with one batched label fetch and one batched text fetch.

        Parameters
        ----------
        ready
            The joined impressions.
        get_labels
            Query ids -> their records (None where missing), in order; called first.
        get_texts
            Candidate ids -> their texts (None where missing), in order.
        has_embeddings
            Candidate ids -> whether the student's candidate source has their vectors
            (a student without a candidate tower); None: not checked.
        get_vectors
            Candidate ids -> ``(vectors [n, d], found [n])`` of the teacher's store; asked
            only for shown candidates a fetched record does not list. None: not asked
            (such rows are feedback only).

        Returns
        -------
        JoinedBatch
        """
        qids, cids = needed_ids(ready)
        labels = get_labels(qids)
        texts = get_texts(cids)
        embedded = None
        if has_embeddings is not None:
            found = [bool(ok) for ok in has_embeddings(cids)]
            embedded = dict(zip(cids, found, strict=True))
        records = dict(zip(qids, labels, strict=True))
        vectors: dict[str, np.ndarray] = {}
        if get_vectors is not None:
            listed = {q: set(r.candidate_ids) for q, r in records.items() if r is not None}
            gaps = list(dict.fromkeys(
                c for j in ready if j.impression.query_id in listed
                for c in j.impression.candidate_ids if c not in listed[j.impression.query_id]))
            if gaps:
                emb, found = get_vectors(gaps)
                vectors = {c: np.asarray(v) for c, v, ok in zip(gaps, emb, found, strict=True)
                           if ok}
        return cls(list(ready), records, dict(zip(cids, texts, strict=True)), embedded, vectors)

    def missing_vectors(self) -> list[str]:
        """Candidates with a text but no vector (:attr:`embedded` False), first-seen order."""
        if self.embedded is None:
            return []
        return [c for c, ok in self.embedded.items() if not ok and self.texts.get(c) is not None]


@dataclass
class LearnStats:
    """What one :meth:`OnlineLearner.learn_many` call saw and did.

    Parameters
    ----------
    batch
        What building the batch saw (label hits / misses, rows, clicks, ...).
    stepped
        Whether an optimizer step was taken.
    loss, kd, feedback
        The total loss and its two parts (None when no step was taken).
    agreement
        Teacher-student top-1 agreement on the batch's labelled rows, before the
        step (None when no step was taken or no row had a teacher).
    embedding_misses
        Shown candidates dropped because their vector is missing
        (:attr:`JoinedBatch.embedded`); not in ``batch.text_misses``.
    """

    batch: BatchStats
    stepped: bool = False
    loss: float | None = None
    kd: float | None = None
    feedback: float | None = None
    agreement: float | None = None
    embedding_misses: int = 0


class OnlineLearner:
    """A student, an AdamW optimizer and the online loss: ``learn_many`` takes one step.

    Parameters
    ----------
    student
        The model being trained (any registered :class:`~student.base.Student`).
    lr
        AdamW learning rate.
    weight_decay
        AdamW weight decay.
    alpha
        Weight of listwise KD; ``1 - alpha`` goes to IPW click feedback.
    temperature
        KD temperature.
    eta
        Position-bias exponent of the click propensity ``(1/rank)^eta``; 0 = naive.
    max_ipw_weight
        Cap of the inverse-propensity weights.
    max_grad_norm
        Gradient clipping norm; None = no clipping.

    Examples
    --------
    In-process, with no stream, store or file (as ``tests/test_online_learner.py``
    does)::

        learner = OnlineLearner(BowStudent(tokenizer, "v1", BowConfig(dim=16)), lr=0.01)
        imp = Impression(request_id="r1", query_id="q1", query="add two numbers",
                         candidate_ids=["a", "b"], model_version="m", event_time=now)
        label = SoftLabelRecord(query_id="q1", teacher_version="v1",
                                candidate_ids=["a", "b"], scores=np.array([0.7, 0.1]),
                                query_embedding=np.zeros(4), logit_scale=20.0)
        stats = learner.learn_many(JoinedBatch(
            [JoinedImpression(imp, feedback=[])], labels={"q1": label},
            texts={"a": "def add(a, b): return a + b", "b": "def rev(s): return s[::-1]"}))
        stats.stepped, stats.loss, stats.agreement     # True, the loss, top-1 agreement
        learner.score("add two numbers", ["def add(a, b): ...", "def rev(s): ..."])
        snapshot = learner.state_dict()                # tensors: weights + optimizer
        other.load_state_dict(snapshot)                # same architecture: same next step
    """

    def __init__(
        self,
        student: Student,
        *,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        alpha: float = 0.5,
        temperature: float = 4.0,
        eta: float = 1.0,
        max_ipw_weight: float = 10.0,
        max_grad_norm: float | None = 5.0,
    ) -> None:
        self.student = student
        self.alpha = alpha
        self.max_grad_norm = max_grad_norm
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            student.parameters(), lr=lr, weight_decay=weight_decay, foreach=False)
        self.loss = OnlineLoss(alpha, ListwiseKDLoss(temperature),
                               IPWClickLoss(eta, max_ipw_weight))

    @classmethod
    def from_config(cls, student: Student, cfg: OnlineTrainerConfig) -> OnlineLearner:
        """The learner the online trainer builds from its config.

        Parameters
        ----------
        student
            The model to train.
        cfg
            The trainer config (``lr``, ``weight_decay``, ``alpha``, ``temperature``,
            ``eta``, ``max_ipw_weight``, ``max_grad_norm`` are used).

        Returns
        -------
        OnlineLearner
        """
        return cls(student, lr=cfg.lr, weight_decay=cfg.weight_decay, alpha=cfg.alpha,
                   temperature=cfg.temperature, eta=cfg.eta, max_ipw_weight=cfg.max_ipw_weight,
                   max_grad_norm=cfg.max_grad_norm)

    # -- learning --------------------------------------------------------------------------
    def learn_many(self, batch: JoinedBatch) -> LearnStats:
        """One optimizer step on ``batch``, or none when nothing in it can teach.

        Parameters
        ----------
        batch
            Joined impressions with their labels and candidate texts.

        Returns
        -------
        LearnStats
            The batch statistics, whether a step was taken, its loss parts and the
            pre-step agreement.

        Raises
        ------
        student.asym.MissingCandidateError
            When a student without a candidate tower meets a candidate its source
            lacks and ``batch.embedded`` did not say so (not checked, or the vector
            vanished after the check).
        """
        texts, missing = batch.texts, set(batch.missing_vectors())
        if missing:  # dropped from their rows exactly like a candidate without a text
            texts = {c: None if c in missing else t for c, t in texts.items()}
        tb = build_batch(batch.ready, batch.labels, texts, batch.vectors)
        misses = sum(c in missing for j in batch.ready for c in j.impression.candidate_ids)
        tb.stats.text_misses -= misses
        stats = LearnStats(tb.stats, embedding_misses=misses)
        if not len(tb):
            return stats
        self.student.train()
        # by id: the store keys the teacher's vectors by the impression's ids
        scores = self.student.forward_scores(tb.queries, tb.candidates,
                                             candidate_ids=tb.candidate_ids).scores
        parts = self.loss(scores, tb.mask, teacher_logits=tb.teacher_logits,
                          has_teacher=tb.has_teacher, clicks=tb.clicks, ranks=tb.ranks,
                          propensities=tb.propensities)
        alpha = self.alpha
        if not ((alpha > 0 and parts.n_kd) or (alpha < 1 and parts.n_feedback)):
            return stats  # zero gradient: an AdamW step would still move the weights
        stats.agreement = top1_agreement(scores, tb.teacher_logits, tb.mask, tb.has_teacher)
        self.optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.optimizer.step()
        stats.stepped = True
        stats.loss = float(parts.loss.detach())
        stats.kd, stats.feedback = parts.kd, parts.feedback
        return stats

    def score(self, query: str, candidates: Sequence[str],
              candidate_ids: Sequence[str] | None = None) -> np.ndarray:
        """The student's logits ``s_S * cosine`` of ``query`` against ``candidates``.

        Parameters
        ----------
        query
            Query text.
        candidates
            Candidate texts (code).
        candidate_ids
            Their ids; needed by a student scored against the store when the ids are
            not content hashes (:meth:`~student.base.Student.score`).

        Returns
        -------
        np.ndarray
            float32 ``[len(candidates)]``; eval mode, no gradient.
        """
        return self.student.score(query, candidates, candidate_ids)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Student weights and optimizer state as one flat dict of tensors.

        Returns
        -------
        dict[str, torch.Tensor]
            ``student.<param>`` and ``optimizer.state.<param index>.<name>``: CPU
            copies (a snapshot, ready for safetensors). The optimizer's
            hyperparameters are in :meth:`state_meta`.
        """
        out = {STUDENT_PREFIX + k: v.detach().cpu().clone()
               for k, v in self.student.state_dict().items()}
        tensors, _ = optimizer_split(self.optimizer)  # views of the live state: copy them
        out.update({OPTIMIZER_PREFIX + k: v.clone() for k, v in tensors.items()})
        return out

    def state_meta(self) -> dict[str, Any]:
        """The JSON-ready rest of the optimizer state (param groups, non-tensor entries)."""
        return optimizer_split(self.optimizer)[1]

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor],
                        meta: Mapping[str, Any] | None = None) -> None:
        """Restore student weights and optimizer state from :meth:`state_dict` output.

        Parameters
        ----------
        tensors
            A :meth:`state_dict` of a learner with the same architecture.
        meta
            Its :meth:`state_meta`; None keeps this learner's own hyperparameters
            (param groups) and takes every optimizer state entry from ``tensors``.
        """
        weights = {k[len(STUDENT_PREFIX):]: v for k, v in tensors.items()
                   if k.startswith(STUDENT_PREFIX)}
        optim = {k[len(OPTIMIZER_PREFIX):]: v.clone() for k, v in tensors.items()
                 if k.startswith(OPTIMIZER_PREFIX)}  # torch keeps e.g. ``step`` uncopied
        if meta is None:
            meta = {"param_groups": self.optimizer.state_dict()["param_groups"], "state": {}}
        self.student.load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(optimizer_join(optim, dict(meta)))
