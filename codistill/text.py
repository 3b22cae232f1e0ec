"""Lexical text helpers shared by every stage: identifier sub-words and BM25.

BM25 negatives (``tasks``) and the BM25 baseline every stage reports (teacher
evaluation, student distillation) must tokenise exactly alike, or the baseline
would not be the ranker the hard negatives were mined against; so the tokenizer
and the baseline live here, below all of them.

The baseline: one BM25 index over all the set's unique candidates rather than
one per list, because IDF from 32 texts is noise (a subword in 2 of 32
candidates looks rare) while the set-wide collection gives term statistics like
a real code index; each list is then ranked by the BM25 scores of its own
candidates. Mind the bias: the builder draws about half the negatives from the
top BM25 hits of the same tokenizer, so BM25 is handicapped on these lists by
construction. It is the baseline the data were made hard *for*, and a model
that does not beat it has learned nothing beyond word overlap.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from codistill import metrics
from codistill.ranking import RankingExample

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SUBWORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+[0-9]*|[A-Z]+[0-9]*|[0-9]+")
_STOP = frozenset(STOPWORDS_EN)


@contextmanager
def quiet_bm25s() -> Iterator[None]:
    """Silence bm25s's per-index DEBUG/INFO log lines (noise in every build and evaluation)."""
    logger = logging.getLogger("bm25s")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def subword_tokens(text: str) -> list[str]:
    """Identifier sub-words, lowercased: ``parseHTTPHeader_v2`` -> parse, http, header, v2.

    The same tokenizer serves docstrings and code so that ``read_file`` in code
    matches "read a file" in a query. Digits stay on the word they follow
    (``sha256``, ``utf8``); one-letter pieces and English stopwords carry no
    retrieval signal and are dropped.

    >>> subword_tokens("def parseHTTPHeader_v2(raw): return a sha256 of it")
    ['def', 'parse', 'http', 'header', 'v2', 'raw', 'return', 'sha256']
    """
    out = []
    for ident in _IDENT.findall(text):
        for part in ident.split("_"):
            for sub in _SUBWORD.findall(part):
                low = sub.lower()
                if len(low) > 1 and low not in _STOP:
                    out.append(low)
    return out


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
