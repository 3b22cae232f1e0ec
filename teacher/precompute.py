"""Precompute the teacher's candidate embeddings and soft labels into a store.

Work is chunked, *resumable* and *additive*: before encoding, the store is asked which
candidate embeddings and label records of this teacher version already exist,
and only the rest is done, so re-running after an interruption finishes the job
without redoing it. Writes go through a one-thread executor so encoding (CPU)
and store I/O (network or disk) overlap. The version is marked complete, and
optionally made current, only after every split is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from codistill.ranking import RankingExample
from stores.base import SoftLabelRecord, Store, VersionInfo
from teacher.model import Teacher


@dataclass
class PrecomputeStats:
    candidates_total: int = 0
    candidates_written: int = 0
    queries_total: int = 0
    queries_written: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    per_split: dict[str, dict[str, int]] = field(default_factory=dict)

    def rates(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {
            "candidates_per_s": self.candidates_written / s,
            "queries_per_s": self.queries_written / s,
        }


class _Writer:
    """Serialize store writes on one background thread; keep at most ``depth`` in flight."""

    def __init__(self, depth: int = 2) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self.pending: list[Future[None]] = []
        self.depth = depth

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        while len(self.pending) >= self.depth:
            self.pending.pop(0).result()  # re-raises write errors here
        self.pending.append(self.pool.submit(fn, *args))

    def drain(self) -> None:
        for fut in self.pending:
            fut.result()
        self.pending.clear()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True)


def version_info(teacher: Teacher, embedding_dtype: str) -> VersionInfo:
    return VersionInfo(
        teacher_version=teacher.version,
        model=teacher.card.base,
        logit_scale=teacher.logit_scale,
        dim=teacher.dim,
        embedding_dtype=embedding_dtype,  # type: ignore[arg-type]
        meta={"kind": teacher.card.kind, "weights_sha256": teacher.card.weights_sha256,
              "id_scheme": str(teacher.card.id_scheme)},
    )


def precompute(
    teacher: Teacher,
    store: Store,
    splits: Mapping[str, Sequence[RankingExample]],
    embedding_dtype: str = "float16",
    chunk: int = 256,
    make_current: bool = True,
    progress: bool = True,
    on_chunk: Callable[[str, int], None] | None = None,
) -> PrecomputeStats:
    """Write candidate texts + embeddings and one soft-label record per query.

    Into a new (or half-written) version, then marked complete; into a version that
    is complete already, what it lacks is *appended* (new candidates and queries
    only, with sequence numbers; nothing it holds is overwritten).
    """
    version = teacher.version
    store.begin_version(version_info(teacher, embedding_dtype))
    existing = store.get_version(version)
    appending = existing is not None and existing.status == "complete"
    stats = PrecomputeStats()
    start = time.perf_counter()
    writer = _Writer()
    try:
        for split, examples in splits.items():
            n_c, n_q = _split(teacher, store, split, examples, chunk, writer, stats, progress, on_chunk)
            stats.per_split[split] = {"candidates_written": n_c, "queries_written": n_q,
                                      "queries": len(examples)}
        writer.drain()
    finally:
        writer.close()
    stats.seconds = time.perf_counter() - start
    if not appending:  # an appended version keeps its counts; the store adds the new records
        counts = {f"{s}_queries": v["queries"] for s, v in stats.per_split.items()}
        counts["candidates"] = stats.candidates_total
        store.complete_version(version, counts)
    if make_current:
        store.set_current(version)
    return stats


def _split(
    teacher: Teacher,
    store: Store,
    split: str,
    examples: Sequence[RankingExample],
    chunk: int,
    writer: _Writer,
    stats: PrecomputeStats,
    progress: bool,
    on_chunk: Callable[[str, int], None] | None,
) -> tuple[int, int]:
    version = teacher.version
    texts: dict[str, str] = {}
    for ex in examples:
        texts.update(zip(ex.candidate_ids, ex.candidates, strict=True))
    ids = list(texts)
    stats.candidates_total += len(ids)
    stats.queries_total += len(examples)

    todo = [cid for cid, done in zip(ids, store.has_embeddings(version, ids), strict=True) if not done]
    bar = tqdm(total=len(todo), desc=f"{split}: candidates", unit="text", disable=not progress)
    for i in range(0, len(todo), chunk):
        part = todo[i : i + chunk]
        t0 = time.perf_counter()
        emb = teacher.encode([texts[c] for c in part])
        stats.encode_seconds += time.perf_counter() - t0
        writer.submit(_put_candidates, store, version, {c: texts[c] for c in part}, part, emb)
        stats.candidates_written += len(part)
        bar.update(len(part))
        if on_chunk:
            on_chunk(f"{split}:candidates", i // chunk)
    bar.close()
    writer.drain()  # labels of a resumed run may read candidates written above

    done = store.has_labels(version, [ex.query_id for ex in examples])
    pending = [ex for ex, d in zip(examples, done, strict=True) if not d]
    bar = tqdm(total=len(pending), desc=f"{split}: soft labels", unit="query", disable=not progress)
    for i in range(0, len(pending), chunk):
        part = pending[i : i + chunk]
        t0 = time.perf_counter()
        records = _label_records(teacher, part)
        stats.encode_seconds += time.perf_counter() - t0
        writer.submit(store.put_labels, records)
        stats.queries_written += len(part)
        bar.update(len(part))
        if on_chunk:
            on_chunk(f"{split}:labels", i // chunk)
    bar.close()
    return len(todo), len(pending)


def _put_candidates(
    store: Store, version: str, texts: dict[str, str], ids: list[str], emb: np.ndarray
) -> None:
    store.put_texts(texts)  # texts first: an embedding never points at a missing text
    store.put_embeddings(version, ids, emb)


def _label_records(teacher: Teacher, examples: Sequence[RankingExample]) -> list[SoftLabelRecord]:
    from teacher.evaluate import embed_examples  # cached: candidates were just encoded

    q_emb, c_emb, spans = embed_examples(teacher, examples)
    return [
        SoftLabelRecord(
            query_id=ex.query_id,
            teacher_version=teacher.version,
            candidate_ids=list(ex.candidate_ids),
            scores=(c_emb[idx] @ q_emb[i]).astype(np.float32),
            query_embedding=q_emb[i],
            logit_scale=teacher.logit_scale,
        )
        for i, (ex, idx) in enumerate(zip(examples, spans, strict=True))
    ]
