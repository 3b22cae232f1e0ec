"""Ranking metrics: hand-computed cases and a cross-check against ir-measures (trec_eval)."""

import math

import ir_measures
import numpy as np
import pytest
from ir_measures import RR, R, nDCG

from codistill import metrics


def test_hand_computed_single_relevant() -> None:
    scores = [0.9, 0.8, 0.7, 0.1]
    labels = [0, 0, 1, 0]  # gold at rank 3
    assert metrics.mrr_at_k(scores, labels, 10) == pytest.approx(1 / 3)
    assert metrics.mrr_at_k(scores, labels, 2) == 0.0
    assert metrics.ndcg_at_k(scores, labels, 10) == pytest.approx(1 / math.log2(4))
    assert metrics.recall_at_k(scores, labels, 1) == 0.0
    assert metrics.recall_at_k(scores, labels, 3) == 1.0


def test_hand_computed_graded() -> None:
    scores = [3.0, 2.0, 1.0]
    labels = [1, 2, 0]
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert metrics.ndcg_at_k(scores, labels, 10) == pytest.approx(dcg / idcg)
    assert metrics.mrr_at_k(scores, labels) == 1.0
    assert metrics.recall_at_k(scores, labels, 1) == 0.5


def test_ties_keep_candidate_order_and_no_relevant_is_zero() -> None:
    assert metrics.mrr_at_k([1.0, 1.0, 1.0], [0, 1, 0]) == 0.5
    assert metrics.evaluate([[0.2, 0.1]], [[0, 0]])["mrr@10"] == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.evaluate([[1.0]], [[1]], ["map@3"])


def test_matches_ir_measures_on_random_runs() -> None:
    rng = np.random.default_rng(0)
    scores, labels, qrels, run = [], [], [], []
    for q in range(200):
        n = int(rng.integers(5, 40))
        s = rng.normal(size=n)
        lab = np.zeros(n, dtype=int)
        lab[rng.choice(n, size=int(rng.integers(1, 4)), replace=False)] = rng.integers(1, 4, size=1)[0]
        scores.append(s)
        labels.append(lab)
        for i in range(n):
            run.append(ir_measures.ScoredDoc(f"q{q}", f"d{i}", float(s[i])))
            qrels.append(ir_measures.Qrel(f"q{q}", f"d{i}", int(lab[i])))
    ref = ir_measures.calc_aggregate([RR @ 10, nDCG @ 10, R @ 1, R @ 5, R @ 10], qrels, run)
    ours = metrics.evaluate(scores, labels)
    assert ours["n_queries"] == 200
    assert ours["mrr@10"] == pytest.approx(ref[RR @ 10], abs=1e-6)
    assert ours["ndcg@10"] == pytest.approx(ref[nDCG @ 10], abs=1e-6)
    for k in (1, 5, 10):
        assert ours[f"recall@{k}"] == pytest.approx(ref[R @ k], abs=1e-6)
