"""Offline ranking metrics, one module for every stage.

Conventions follow trec_eval (and so ``ir-measures``/``ranx``, which the tests
cross-check against): candidates are ranked by descending score, ties broken by
original candidate order; relevance is graded (``> 0`` means relevant); NDCG uses
linear gain ``rel / log2(rank + 1)``; queries without any relevant candidate
count as 0 for every metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_METRICS = ("mrr@10", "ndcg@10", "recall@1", "recall@5", "recall@10")


def ranking_order(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices by descending score; stable so ties keep candidate order.

    >>> ranking_order([0.1, 0.9, 0.9]).tolist()
    [1, 2, 0]
    """
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def mrr_at_k(scores: Sequence[float], labels: Sequence[int], k: int = 10) -> float:
    """Reciprocal rank of the first relevant candidate within the top ``k`` (else 0).

    Parameters
    ----------
    scores
        One score per candidate; higher ranks first.
    labels
        Graded relevance per candidate; ``> 0`` is relevant.
    k
        Cut-off.

    Examples
    --------
    >>> print(mrr_at_k([0.9, 0.5, 0.7], [0, 1, 0]))
    0.3333333333333333
    >>> print(mrr_at_k([0.9, 0.5, 0.7], [0, 1, 0], k=2))
    0.0

    References
    ----------
    Voorhees, E. M. (1999). The TREC-8 Question Answering Track Report.
    """
    ranked = np.asarray(labels)[ranking_order(scores)][:k]
    hits = np.flatnonzero(ranked > 0)
    return 1.0 / (hits[0] + 1) if hits.size else 0.0


def ndcg_at_k(scores: Sequence[float], labels: Sequence[int], k: int = 10) -> float:
    """NDCG@k with linear gain: ``sum rel_i / log2(i + 1)`` over the ideal order's.

    >>> ndcg_at_k([0.9, 0.1], [0, 1])  # the relevant item at rank 2
    0.6309297535714575

    References
    ----------
    Järvelin, K. and Kekäläinen, J. (2002). Cumulated Gain-Based Evaluation of IR
    Techniques. ACM TOIS 20(4).
    """
    rel = np.asarray(labels, dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ranked = rel[ranking_order(scores)][:k]
    ideal = np.sort(rel)[::-1][:k]
    idcg = float((ideal * discounts[: ideal.size]).sum())
    return float((ranked * discounts[: ranked.size]).sum()) / idcg if idcg > 0 else 0.0


def recall_at_k(scores: Sequence[float], labels: Sequence[int], k: int) -> float:
    """Share of the relevant candidates found in the top ``k``.

    >>> recall_at_k([0.9, 0.8, 0.1], [1, 0, 1], k=2)
    0.5
    """
    rel = np.asarray(labels) > 0
    total = int(rel.sum())
    return float(rel[ranking_order(scores)][:k].sum()) / total if total else 0.0


def _one(name: str, scores: Sequence[float], labels: Sequence[int]) -> float:
    metric, _, k = name.partition("@")
    if metric == "mrr":
        return mrr_at_k(scores, labels, int(k))
    if metric == "ndcg":
        return ndcg_at_k(scores, labels, int(k))
    if metric == "recall":
        return recall_at_k(scores, labels, int(k))
    raise ValueError(f"unknown metric {name!r}; known: mrr@K, ndcg@K, recall@K")


def per_query(
    scores: Iterable[Sequence[float]],
    labels: Iterable[Sequence[int]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, np.ndarray]:
    """Each metric for each query (for significance tests and plots)."""
    rows = [(s, lab) for s, lab in zip(scores, labels, strict=True)]
    return {m: np.array([_one(m, s, lab) for s, lab in rows]) for m in metrics}


def evaluate(
    scores: Iterable[Sequence[float]],
    labels: Iterable[Sequence[int]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """Mean of each metric over queries; ``n_queries`` included.

    >>> evaluate([[0.9, 0.1], [0.2, 0.8]], [[1, 0], [1, 0]], metrics=("mrr@10",))
    {'mrr@10': 0.75, 'n_queries': 2}
    """
    pq = per_query(scores, labels, metrics)
    n = len(next(iter(pq.values()))) if pq else 0
    out = {m: float(v.mean()) if n else 0.0 for m, v in pq.items()}
    out["n_queries"] = n
    return out
