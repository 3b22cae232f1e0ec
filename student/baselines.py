"""BM25 over each query's candidate list: the lexical floor a student must beat.

The baseline lives in :mod:`codistill.text` (the teacher's evaluation reports it
too, and the tokenizer is the one the hard negatives were mined with); these are
its names on the student floor.
"""

from codistill.text import BM25Ranker, bm25_scores, evaluate_bm25

__all__ = ["BM25Ranker", "bm25_scores", "evaluate_bm25"]
