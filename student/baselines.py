"""BM25 over each query's candidate list: the lexical floor a student must beat.

Why one index over all the set's unique candidates rather than one per list: IDF
from 32 texts is noise (a subword in 2 of 32 candidates looks rare), while the
set-wide collection gives term statistics like a real code index; each list is
then ranked by the BM25 scores of its own candidates. Queries and code go through
the same identifier sub-word tokenizer the data builder uses for its hard
negatives (``parseHTTPHeader`` -> parse, http, header), so ``read_file`` in code
matches "read a file" in a docstring.

Mind the bias: the builder draws about half the negatives from the top BM25 hits
of the same tokenizer, so BM25 is handicapped on these lists by construction. It
is the baseline the data were made hard *for*, and a student that does not beat
it has learned nothing beyond word overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from codistill import metrics
from codistill.ranking import RankingExample
from codistill.text import quiet_bm25s, subword_tokens


class BM25Ranker:
    """BM25 (Lucene variant, ``bm25s``) over a fixed collection of code texts."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        import bm25s

        self.texts = list(dict.fromkeys(texts))  # unique, first-seen order
        self.position = {t: i for i, t in enumerate(self.texts)}
        self.retriever = bm25s.BM25(k1=k1, b=b)
        with quiet_bm25s():
            self.retriever.index([subword_tokens(t) for t in self.texts], show_progress=False)

    def scores(self, query: str, candidates: Sequence[str]) -> np.ndarray:
        """BM25 score of each candidate (float32); all zeros if the query has no sub-word.

        Candidates must belong to the indexed collection (KeyError otherwise).
        """
        tokens = subword_tokens(query)
        rows = np.fromiter((self.position[c] for c in candidates), dtype=np.int64)
        if not tokens:
            return np.zeros(len(rows), dtype=np.float32)
        return self.retriever.get_scores(tokens)[rows].astype(np.float32)


def bm25_scores(examples: Sequence[RankingExample]) -> list[np.ndarray]:
    """BM25 scores of every list, with IDF from the unique candidates of ``examples``."""
    ranker = BM25Ranker([c for ex in examples for c in ex.candidates])
    return [ranker.scores(ex.query, ex.candidates) for ex in examples]


def evaluate_bm25(examples: Sequence[RankingExample]) -> dict[str, float]:
    """MRR@10, NDCG@10, Recall@k of BM25 on a ranking set (``codistill.metrics`` rules)."""
    return metrics.evaluate(bm25_scores(examples), [ex.labels for ex in examples])
