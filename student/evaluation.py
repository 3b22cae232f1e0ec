"""Offline evaluation of a student: ranking metrics, agreement with the teacher, share kept.

The metrics are ``codistill.metrics``' (MRR@10, NDCG@10, Recall@k, ties broken by
list order). ``teacher_kl`` measures how far the student's distribution over a
whole list is from the teacher's; ``share_kept`` is the fraction of the teacher's
metric the student keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from codistill import metrics
from codistill.ranking import RankingExample
from stores.base import SoftLabelRecord, Store
from student.base import Student, unique_candidates
from student.labels import read_labels

EVAL_SPLITS = ("valid", "test")


@torch.inference_mode()
def student_scores(student: Student, examples: Sequence[RankingExample]) -> list[np.ndarray]:
    """The student's logits for every list; each distinct text is encoded once.

    Runs in eval mode and restores the student's previous mode afterwards. The
    examples' ``candidate_ids`` go with the texts (``unique_candidates``), so a
    student without a candidate tower finds candidates stored under user-chosen ids.

    Parameters
    ----------
    student : Student
        Any student (one without a candidate tower asks its candidate source, by id).
    examples : sequence of RankingExample
        The lists to score.

    Returns
    -------
    list of numpy.ndarray
        float32 ``[K_i]`` logits ``s_S * cosine`` per list, in candidate order.
    """
    was_training = student.training
    student.eval()
    try:
        position, ids = unique_candidates([ex.candidates for ex in examples],
                                          [ex.candidate_ids for ex in examples])
        q = student.encode_queries([ex.query for ex in examples])
        c = student.encode_candidates(list(position), ids)
        out = []
        for i, ex in enumerate(examples):
            rows = torch.tensor([position[t] for t in ex.candidates])
            out.append(student.score_embeddings(q[i : i + 1], c[rows])[0].float().numpy())
        return out
    finally:
        student.train(was_training)


def evaluate_student(student: Student, examples: Sequence[RankingExample]) -> dict[str, float]:
    """Ranking metrics of a student on a ranking set.

    Parameters
    ----------
    student : Student
        The student to score with (``student_scores``).
    examples : sequence of RankingExample
        Lists with graded relevance labels.

    Returns
    -------
    dict of str to float
        ``codistill.metrics.evaluate``'s MRR@10, NDCG@10, Recall@k and ``n_queries``.
    """
    return metrics.evaluate(student_scores(student, examples), [ex.labels for ex in examples])


def teacher_kl(scores: Sequence[np.ndarray], records: Sequence[SoftLabelRecord],
               temperature: float = 1.0) -> float:
    """Mean ``KL(teacher || student)`` of the candidate distributions at ``temperature``.

    ``KL = sum_k p_T(k) (log p_T(k) - log p_S(k))`` with ``p_T = softmax(s_T t / T)``
    over the teacher's stored cosines ``t`` and ``p_S = softmax(s / T)`` over the
    student's logits ``s``. On queries the student never trained on, this is a less
    noisy view of transfer than MRR, which only looks at the gold candidate.

    Parameters
    ----------
    scores : sequence of numpy.ndarray
        The student's logits per list (``student_scores``).
    records : sequence of SoftLabelRecord
        The teacher's record of each list, in the same order.
    temperature : float, default 1.0
        Softmax temperature ``T`` of both sides.

    Returns
    -------
    float
        The mean over lists (0.0 for no lists), in nats.

    Examples
    --------
    >>> rec = SoftLabelRecord(query_id="q", teacher_version="t", candidate_ids=["a", "b"],
    ...                       scores=np.array([0.5, 0.25], dtype=np.float32),
    ...                       query_embedding=np.zeros(2, dtype=np.float32), logit_scale=10.0)
    >>> teacher_kl([np.array([5.0, 2.5])], [rec])  # the teacher's own logits
    0.0
    >>> round(teacher_kl([np.array([0.0, 0.0])], [rec]), 4)  # uniform: log 2 - H(p_T)
    0.4246
    """
    total = 0.0
    for s, rec in zip(scores, records, strict=True):
        log_t = _log_softmax(rec.logit_scale * rec.scores.astype(np.float64) / temperature)
        log_s = _log_softmax(np.asarray(s, dtype=np.float64) / temperature)
        total += float((np.exp(log_t) * (log_t - log_s)).sum())
    return total / max(len(records), 1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def share_kept(student: dict[str, float], teacher: dict[str, float], key: str = "mrr@10") -> float:
    """Share of the teacher's metric the student keeps.

    Parameters
    ----------
    student, teacher : dict of str to float
        Metrics as ``evaluate_student`` returns them.
    key : str, default ``"mrr@10"``
        The metric to compare.

    Returns
    -------
    float
        ``student[key] / teacher[key]``, ``nan`` if the teacher scores 0.

    Examples
    --------
    >>> share_kept({"mrr@10": 0.3}, {"mrr@10": 0.6})
    0.5
    >>> share_kept({"mrr@10": 0.3}, {"mrr@10": 0.0})
    nan
    """
    return student[key] / teacher[key] if teacher[key] > 0 else float("nan")


def teacher_metrics_from_store(
    store: Store, version: str, examples: Sequence[RankingExample]
) -> dict[str, float]:
    """The teacher's metrics recomputed from its stored scores (no teacher model needed).

    Parameters
    ----------
    store : Store
        The store holding teacher ``version``'s soft labels of ``examples``.
    version : str
        The teacher version.
    examples : sequence of RankingExample
        The lists (``read_labels`` checks each against its record).

    Returns
    -------
    dict of str to float
        ``codistill.metrics.evaluate`` of the stored cosines.
    """
    records = read_labels(store, version, examples)
    return metrics.evaluate([r.scores for r in records], [ex.labels for ex in examples])
