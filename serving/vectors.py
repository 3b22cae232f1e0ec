"""Candidate vectors for serving: the teacher's stored embeddings through an LRU cache.

An asymmetric student scores queries against the vectors its teacher wrote to the
store (``teacher precompute``), under that teacher version. A request names up to a
few hundred candidates, and popular code recurs across requests, so an in-memory LRU
in front of the store keeps most lookups off the network. When the store is
unreachable the cache still answers for what it holds and the rest is reported
missing (the caller encodes those with the bundle's fallback graph): a store outage
degrades quality for cold candidates, never availability.

An outage starts at the first failed store call after a good one and ends at the next
good one. While it lasts the cache does not ask the store at all (a circuit breaker:
a hung Redis would cost every request its socket timeout), cold candidates fall back
at once, and a background thread probes the store every ``probe_every_s`` until it
answers: a server that reports unready gets no traffic, so it must notice the store's
return without a request. Keep the store's read timeout short for serving (a Redis
URL takes ``?socket_timeout=0.25``): the first call into a hung store still waits it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from codistill.metrics import evaluate
from codistill.ranking import RankingExample
from serving.runtime import OnnxRanker
from stores.base import CandidateStore, StoreError


class Lookup(NamedTuple):
    """One :meth:`VectorCache.get`: the vectors, what was found, and what it cost."""

    vectors: np.ndarray | None
    found: np.ndarray
    hits: int  # from memory
    misses: int  # neither in memory nor in the store
    store_failed: bool  # this call's store read failed


class VectorCache:
    """``id -> teacher vector`` of one teacher version, LRU-bounded, store-backed.

    Parameters
    ----------
    store : CandidateStore or None
        Where the vectors live; ``None`` serves from ``put`` only (tests, bundles
        with a candidate tower).
    version : str
        The teacher version (the bundle's ``teacher_version``).
    capacity : int
        Vectors kept in memory.
    probe_every_s : float
        Least interval between two store probes of :meth:`store_down_for`.
    """

    def __init__(self, store: CandidateStore | None, version: str, capacity: int = 100_000,
                 probe_every_s: float = 0.5) -> None:
        self.store, self.version, self.capacity = store, version, capacity
        self.probe_every_s = probe_every_s
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self.hits = self.misses = self.store_errors = 0
        self.last_store_ok: float | None = time.monotonic() if store is not None else None
        self.last_store_error: float | None = None
        self.down_since: float | None = None  # first failure after the last good call
        self._last_probe = 0.0
        self._prober: threading.Thread | None = None

    def put(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        with self._lock:
            for cid, vec in zip(ids, vectors, strict=True):
                self._lru[cid] = np.asarray(vec, dtype=np.float32)
                self._lru.move_to_end(cid)
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)

    def get(self, ids: Sequence[str]) -> Lookup:
        """Vectors of ``ids`` (rows of zeros where missing), a found mask and this call's
        own counts (concurrent calls must not read each other's from shared counters).

        ``vectors`` is None when nothing is known (no vector dimension yet).
        """
        found = np.zeros(len(ids), dtype=bool)
        rows: list[np.ndarray | None] = [None] * len(ids)
        with self._lock:
            for i, cid in enumerate(ids):
                vec = self._lru.get(cid)
                if vec is not None:
                    self._lru.move_to_end(cid)
                    rows[i], found[i] = vec, True
        hits = int(found.sum())
        failed = False
        cold = [i for i in range(len(ids)) if not found[i]]
        if cold and self.store is not None and self.down_since is not None:
            failed = True  # known down: fall back now; the probe thread finds it back
            self._watch()
        elif cold and self.store is not None:
            cold_ids = [ids[i] for i in cold]
            try:
                emb, ok = self.store.get_embeddings(self.version, cold_ids)
                self._store_answered()
            except StoreError:
                self._store_failed()
                failed = True
            else:
                got = [(i, cid, emb[n]) for n, (i, cid) in enumerate(zip(cold, cold_ids,
                                                                          strict=True)) if ok[n]]
                if got:
                    self.put([cid for _, cid, _ in got], np.stack([v for _, _, v in got]))
                for i, _, vec in got:
                    rows[i], found[i] = vec, True
        misses = int((~found).sum())
        with self._lock:
            self.hits += hits
            self.misses += misses
        dim = next((r.shape[0] for r in rows if r is not None), None)
        if dim is None:
            return Lookup(None, found, hits, misses, failed)
        out = np.zeros((len(ids), dim), dtype=np.float32)
        for i, r in enumerate(rows):
            if r is not None:
                out[i] = r
        return Lookup(out, found, hits, misses, failed)

    def _store_answered(self) -> None:
        self.last_store_ok = time.monotonic()
        self.down_since = None

    def _store_failed(self) -> None:
        now = time.monotonic()
        self.store_errors += 1
        self.last_store_error = now
        if self.down_since is None:
            self.down_since = now
        self._watch()

    def _watch(self) -> None:
        """Start the probe thread unless one runs: it probes until the store answers."""
        with self._lock:
            if self._prober is not None and self._prober.is_alive():
                return
            self._prober = threading.Thread(target=self._probe_until_back, daemon=True,
                                            name="store-probe")
            self._prober.start()

    def _probe_until_back(self) -> None:
        while self.down_since is not None:
            time.sleep(self.probe_every_s)
            self._probe()

    def _probe(self) -> None:
        """One store round trip (a vector read of a reserved id), at most every probe_every_s."""
        assert self.store is not None
        if not self._probe_lock.acquire(blocking=False):
            return  # another caller is probing
        try:
            if time.monotonic() - self._last_probe < self.probe_every_s:
                return
            self._last_probe = time.monotonic()
            try:
                self.store.get_embeddings(self.version, ["codistill-readiness-probe"])
            except StoreError:
                self.last_store_error = time.monotonic()  # still down: the outage goes on
            else:
                self._store_answered()
        finally:
            self._probe_lock.release()

    def store_down_for(self) -> float:
        """Seconds since the outage began (0 if the store is fine); never waits on the store."""
        since = self.down_since
        if self.store is None or since is None:
            return 0.0
        self._watch()
        return time.monotonic() - since

    def __len__(self) -> int:
        return len(self._lru)


def example_scores(ranker: OnnxRanker, vectors: VectorCache | None, ex: RankingExample
                   ) -> tuple[np.ndarray, int]:
    """Scores of one ranking list the way the server computes them, and the fallbacks used.

    Candidates come from ``vectors`` by id when the bundle has no candidate tower;
    those it lacks (and every candidate, with a tower) are encoded from their text.
    """
    q = ranker.embed_queries([ex.query])[0]
    if ranker.card.has_candidate_tower or vectors is None:
        c = ranker.embed_candidates(ex.candidates)
        return ranker.scores(q, c), 0 if ranker.card.has_candidate_tower else len(c)
    c, found, *_ = vectors.get(ex.candidate_ids)
    if c is None:
        c = np.zeros((len(ex.candidates), ranker.card.embedding_dim), dtype=np.float32)
    if not found.all():
        cold = np.flatnonzero(~found)
        c[cold] = ranker.embed_candidates([ex.candidates[i] for i in cold])
    return ranker.scores(q, c), int((~found).sum())


def evaluate_bundle(ranker: OnnxRanker, vectors: VectorCache | None,
                    examples: Sequence[RankingExample]) -> dict[str, float]:
    """MRR@10 / NDCG@10 / Recall@k of a bundle on ranking lists, as served."""
    scores = [example_scores(ranker, vectors, ex)[0] for ex in examples]
    return evaluate(scores, [ex.labels for ex in examples])
