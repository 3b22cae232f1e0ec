"""Candidate lists: the gold function plus hard (BM25) and random negatives.

Hard negatives share vocabulary with the query, so a model must read the code
rather than match words; random ones keep the easy end of the score range in
the training signal (a model trained on both ranks both kinds of list).
Negatives come only from the query's own split, so no held-out code is ever
seen in training. Per-query randomness is seeded by (seed, split, gold id):
a query's list does not change when other queries are added or capped away.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import bm25s
import numpy as np
from scipy import sparse
from tqdm import tqdm

from codistill.ids import query_id
from codistill.ranking import RankingExample
from codistill.text import quiet_bm25s, subword_tokens
from tasks.mine import Pair
from tasks.split import Split, seeded_key

_QUERY_BATCH = 256  # (batch x pool) float64 scores: 256 x 30k = 60 MB at most





def bm25_hard_negatives(
    queries: Sequence[Pair], pool: Sequence[Pair], n_hard: int, progress: bool = False
) -> list[list[int]]:
    """For each query, pool indices of its top-``n_hard`` BM25 hits over code, gold excluded.

    bm25s computes the BM25 weight of every (token, function) pair; queries are
    then scored in batches as one sparse product (queries x vocab) @ (vocab x
    pool), so no Python code runs per pool item. Hits with zero score (no shared
    token) are not hard and are left out. The vocabulary is numbered in sorted
    order and scores are summed in float64 (exact for these few float32 terms), so
    rankings and ties do not depend on the process's hash seed.
    """
    if n_hard <= 0 or not queries:
        return [[] for _ in queries]
    doc_tokens = [subword_tokens(p.code) for p in pool]
    vocab = {t: i for i, t in enumerate(sorted({t for toks in doc_tokens for t in toks}))}
    retriever = bm25s.BM25()
    corpus_ids = [[vocab[t] for t in toks] for toks in doc_tokens]
    with quiet_bm25s():
        retriever.index((corpus_ids, dict(vocab)), show_progress=progress)  # adds "" to vocab
    weights = _weight_matrix(retriever.scores)
    query_matrix = _query_matrix([subword_tokens(q.summary) for q in queries], vocab)
    gold = {p.cid: i for i, p in enumerate(pool)}
    out: list[list[int]] = []
    for start in tqdm(range(0, len(queries), _QUERY_BATCH), desc="bm25", disable=not progress):
        block = (query_matrix[start : start + _QUERY_BATCH] @ weights).tocsr()
        for row in range(block.shape[0]):
            lo, hi = block.indptr[row], block.indptr[row + 1]
            idx, val = block.indices[lo:hi], block.data[lo:hi]
            keep = (val > 0) & (idx != gold.get(queries[start + row].cid, -1))
            out.append(_top_k(idx[keep], val[keep], n_hard))
    return out


def _weight_matrix(scores: dict) -> sparse.csr_matrix:
    """bm25s's eager index as a (vocab x pool) matrix of BM25 weights."""
    shape = (len(scores["indptr"]) - 1, scores["num_docs"])
    data = np.asarray(scores["data"], dtype=np.float64)
    return sparse.csr_matrix((data, scores["indices"], scores["indptr"]), shape=shape)


def _query_matrix(token_lists: Sequence[list[str]], vocab: dict[str, int]) -> sparse.csr_matrix:
    """(queries x vocab) term counts; a repeated query word counts again, as in bm25s."""
    rows, cols = [], []
    for r, tokens in enumerate(token_lists):
        for t in tokens:
            if t in vocab:
                rows.append(r)
                cols.append(vocab[t])
    data = np.ones(len(rows), dtype=np.float64)
    return sparse.csr_matrix((data, (rows, cols)), shape=(len(token_lists), len(vocab)))


def _top_k(idx: np.ndarray, val: np.ndarray, k: int) -> list[int]:
    """The ``k`` best indices by score, ties broken by lower index (fully specified)."""
    if len(val) > k:
        kth = np.partition(val, len(val) - k)[len(val) - k]
        sel = val >= kth
        idx, val = idx[sel], val[sel]
    return idx[np.lexsort((idx, -val))][:k].tolist()


def build_examples(
    queries: Sequence[Pair],
    pool: Sequence[Pair],
    split: Split,
    negatives: int,
    hard_fraction: float,
    seed: int,
    progress: bool = False,
) -> list[RankingExample]:
    """One ranking example per query: gold + ``negatives`` distinct negatives from ``pool``
    (fewer only if the pool is smaller), in a seeded random order."""
    n_neg = min(negatives, len(pool) - 1)
    n_hard = min(round(negatives * hard_fraction), n_neg)
    hard = bm25_hard_negatives(queries, pool, n_hard, progress)
    examples = []
    for query, hard_idx in tqdm(
        zip(queries, hard, strict=True), total=len(queries), desc=f"candidates/{split}",
        disable=not progress,
    ):
        rng = random.Random(seeded_key(seed, f"{split}\0{query.cid}"))
        taken = {query.cid} | {pool[i].cid for i in hard_idx}
        draw = rng.sample(range(len(pool)), min(len(pool), n_neg + len(taken)))
        rand = [pool[i] for i in draw if pool[i].cid not in taken][: n_neg - len(hard_idx)]
        hard_pairs = [pool[i] for i in hard_idx]
        cands = [query, *hard_pairs, *rand]
        rng.shuffle(cands)
        examples.append(RankingExample(
            query_id=query_id(query.summary),
            query=query.summary,
            candidates=[c.code for c in cands],
            candidate_ids=[c.cid for c in cands],
            labels=[int(c.cid == query.cid) for c in cands],
            meta={
                "source": query.source, "module": query.module, "path": query.path,
                "name": query.name, "lineno": query.lineno, "group": query.group,
                "split": split, "hard_negative_ids": [p.cid for p in hard_pairs],
            },
        ))
    return examples
