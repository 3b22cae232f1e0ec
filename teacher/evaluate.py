"""Offline evaluation of a teacher on any ranking set.

Candidates repeat across lists, so texts are deduplicated before encoding and
embeddings come from the (teacher version, text hash) cache when present.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from codistill import metrics
from codistill.ranking import RankingExample
from teacher.model import Teacher


def unique_texts(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Deduplicate texts; returns (unique texts, index of each input in them)."""
    position: dict[str, int] = {}
    index = np.fromiter((position.setdefault(t, len(position)) for t in texts), dtype=np.int64)
    return list(position), index


def score_examples(teacher: Teacher, examples: Sequence[RankingExample]) -> list[np.ndarray]:
    """Cosine similarity of each query to each of its candidates."""
    q_emb, c_emb, spans = embed_examples(teacher, examples)
    return [c_emb[idx] @ q_emb[i] for i, idx in enumerate(spans)]


def embed_examples(
    teacher: Teacher, examples: Sequence[RankingExample]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Query embeddings, unique-candidate embeddings, and each list's rows in the latter."""
    q_emb = teacher.encode([ex.query for ex in examples], desc="queries")
    flat = [c for ex in examples for c in ex.candidates]
    texts, index = unique_texts(flat)
    c_emb = teacher.encode(texts, desc="candidates")
    bounds = np.cumsum([0] + [len(ex.candidates) for ex in examples])
    spans = [index[bounds[i] : bounds[i + 1]] for i in range(len(examples))]
    return q_emb, c_emb, spans


def evaluate_teacher(teacher: Teacher, examples: Sequence[RankingExample]) -> dict[str, float]:
    scores = score_examples(teacher, examples)
    return metrics.evaluate(scores, [ex.labels for ex in examples])
