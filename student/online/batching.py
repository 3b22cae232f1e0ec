"""Joined impressions + soft labels + candidate texts -> the tensors of one training step.

One row per joined impression, one column per *shown* candidate, in shown order,
so the column index + 1 is the display rank the position-based click model needs:

* ``teacher_logits = record.logit_scale * record.scores`` re-indexed by candidate id
  to the shown order (the teacher scored the query's whole candidate list, the user
  saw a possibly reordered, possibly truncated part of it);
* ``clicks`` = clicked or accepted, ``ranks`` = 1-based shown positions,
  ``propensities`` = the examination propensity a v2 click logged (NaN where none:
  the loss falls back to ``(1 / rank) ** eta``).

Rows are kept when they can teach something (a usable teacher record or a click).
A record covers the list its query was labelled with; a shown candidate outside it
is scored from the record's query embedding and the candidate's stored teacher vector
(``scale * cos``), so one label per query serves every list it is shown with. A query
without a record, or whose record misses a shown candidate with no stored vector, is
*feedback only* for that row (``has_teacher`` False) and is counted, never dropped
silently. Everything here is pure (no I/O), so the trainer can fetch labels and
texts with one batched call each and retry those calls without side effects.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from stores.base import SoftLabelRecord
from streaming.join import JoinedImpression
from student.tokenizer import SubwordTokenizer


@dataclass
class BatchStats:
    """What building one batch saw; the trainer adds these to its counters."""

    impressions: int = 0
    rows: int = 0
    label_hits: int = 0
    label_misses: int = 0  # no record for the query in the pinned version
    label_misaligned: int = 0  # a record exists but lacks a shown candidate (and its vector)
    label_extended: int = 0  # hits whose missing candidates were scored from stored vectors
    text_misses: int = 0  # shown candidates whose text the store does not have
    skipped: int = 0  # impressions with nothing to learn from (no label, no click)
    clicks: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class TrainingBatch:
    """Padded ``[B, K]`` tensors plus the texts the student encodes.

    ``candidate_ids`` name the shown candidates (``candidates`` are their texts); a
    student without a candidate tower is scored by these ids, the store's key.
    """

    request_ids: list[str]
    query_ids: list[str]
    queries: list[str]
    candidate_ids: list[list[str]]
    candidates: list[list[str]]
    teacher_logits: Tensor  # float32 [B, K]; 0 where no teacher
    has_teacher: Tensor  # bool [B]
    clicks: Tensor  # float32 [B, K]
    ranks: Tensor  # float32 [B, K], 1-based shown positions (1 in padding)
    mask: Tensor  # bool [B, K]
    stats: BatchStats = field(default_factory=BatchStats)
    propensities: Tensor | None = None  # float32 [B, K], logged propensity; NaN where none

    def __len__(self) -> int:
        return len(self.queries)


def needed_ids(joined: Sequence[JoinedImpression]) -> tuple[list[str], list[str]]:
    """Unique query ids and candidate ids of ``joined``, first-seen order (one fetch each)."""
    qids = list(dict.fromkeys(j.impression.query_id for j in joined))
    cids = list(dict.fromkeys(c for j in joined for c in j.impression.candidate_ids))
    return qids, cids


def _teacher_row(record: SoftLabelRecord | None, shown: Sequence[str],
                 vectors: Mapping[str, np.ndarray] | None = None
                 ) -> tuple[list[float] | None, bool]:
    """Teacher logits in shown order (or None) and whether stored vectors filled gaps.

    A record holds the cosines of the list its query was first labelled with; a shown
    candidate outside it is scored ``cos(record.query_embedding, vector)`` when its
    stored teacher vector is in ``vectors`` (one label per query serves every list).
    """
    if record is None:
        return None, False
    index = {cid: i for i, cid in enumerate(record.candidate_ids)}
    scale = float(record.logit_scale)
    gaps = [cid for cid in shown if cid not in index]
    extra: dict[str, float] = {}
    if gaps:
        q = np.asarray(record.query_embedding, dtype=np.float32)
        norm = float(np.linalg.norm(q)) if q.size else 0.0
        if not vectors or norm == 0.0 or any(cid not in vectors for cid in gaps):
            return None, False
        for cid in gaps:
            v = np.asarray(vectors[cid], dtype=np.float32)
            extra[cid] = float(v @ q) / (norm * (float(np.linalg.norm(v)) or 1.0))
    row = [scale * (extra[cid] if cid in extra else float(record.scores[index[cid]]))
           for cid in shown]
    return row, bool(gaps)


def build_batch(
    joined: Sequence[JoinedImpression],
    labels: Mapping[str, SoftLabelRecord | None],
    texts: Mapping[str, str | None],
    vectors: Mapping[str, np.ndarray] | None = None,
) -> TrainingBatch:
    """Build the training batch of ``joined`` (see the module docstring for the rules).

    Parameters
    ----------
    joined
        Joined impressions, in order.
    labels
        Soft-label record per query id (None or missing: no teacher for it).
    texts
        Candidate text per candidate id (None or missing: the candidate is dropped).
    vectors
        Stored teacher vectors of shown candidates a query's record lacks (see
        :func:`_teacher_row`); None: such rows are feedback only.

    Returns
    -------
    TrainingBatch
        One row per impression that can teach, with its :class:`BatchStats`.
    """
    stats = BatchStats(impressions=len(joined))
    rows: list[tuple[JoinedImpression, list[str], list[str], list[float] | None, list[float],
                     list[float], list[float]]] = []
    for j in joined:
        imp = j.impression
        clicked, logged = j.clicked(), j.logged_propensities()
        keep = [(pos, cid) for pos, cid in enumerate(imp.candidate_ids, start=1)
                if texts.get(cid) is not None]
        stats.text_misses += len(imp.candidate_ids) - len(keep)
        if not keep:
            stats.skipped += 1
            continue
        ids = [cid for _, cid in keep]
        record = labels.get(imp.query_id)
        teacher, extended = _teacher_row(record, ids, vectors)
        if record is None:
            stats.label_misses += 1
        elif teacher is None:
            stats.label_misaligned += 1
        else:
            stats.label_hits += 1
            stats.label_extended += extended
        row_clicks = [1.0 if clicked[pos - 1] else 0.0 for pos, _ in keep]
        if teacher is None and not any(row_clicks):
            stats.skipped += 1
            continue
        stats.clicks += int(sum(row_clicks))
        ranks = [float(pos) for pos, _ in keep]
        props = [math.nan if logged[pos - 1] is None else float(logged[pos - 1])  # type: ignore[arg-type]
                 for pos, _ in keep]
        rows.append((j, ids, [texts[c] or "" for c in ids], teacher, row_clicks, ranks, props))

    width = max([len(r[1]) for r in rows] + [1])
    n = len(rows)
    teacher_logits = torch.zeros(n, width)
    has_teacher = torch.zeros(n, dtype=torch.bool)
    clicks = torch.zeros(n, width)
    ranks = torch.ones(n, width)
    propensities = torch.full((n, width), math.nan)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for b, (_, ids, _, teacher, row_clicks, row_ranks, row_props) in enumerate(rows):
        k = len(ids)
        mask[b, :k] = True
        clicks[b, :k] = torch.tensor(row_clicks)
        ranks[b, :k] = torch.tensor(row_ranks)
        propensities[b, :k] = torch.tensor(row_props)
        if teacher is not None:
            has_teacher[b] = True
            teacher_logits[b, :k] = torch.tensor(teacher)
    stats.rows = n
    return TrainingBatch(
        request_ids=[r[0].impression.request_id for r in rows],
        query_ids=[r[0].impression.query_id for r in rows],
        queries=[r[0].impression.query for r in rows],
        candidate_ids=[r[1] for r in rows],
        candidates=[r[2] for r in rows],
        teacher_logits=teacher_logits,
        has_teacher=has_teacher,
        clicks=clicks,
        ranks=ranks,
        mask=mask,
        stats=stats,
        propensities=propensities,
    )


def top1_agreement(student: Tensor, teacher: Tensor, mask: Tensor, rows: Tensor) -> float | None:
    """Share of ``rows`` where the student's and the teacher's top candidate coincide.

    The cheapest teacher-student agreement signal that needs no threshold.

    Parameters
    ----------
    student, teacher
        Logits ``[B, K]``.
    mask
        Real candidates ``[B, K]``.
    rows
        Rows to compare ``[B]`` (those with a teacher).

    Returns
    -------
    float | None
        The share in ``[0, 1]``; None when no row has a teacher (nothing to compare).
    """
    if not bool(rows.any()):
        return None
    neg = torch.finfo(student.dtype).min
    s = student.detach()[rows].masked_fill(~mask[rows], neg).argmax(dim=-1)
    t = teacher[rows].masked_fill(~mask[rows], neg).argmax(dim=-1)
    return float((s == t).float().mean())


class CachingTokenizer(SubwordTokenizer):
    """A :class:`SubwordTokenizer` that remembers each text's ids (LRU, ``capacity`` texts).

    A stream shows the same candidates over and over, and WordPiece-encoding the same
    code texts again is a large part of a step on CPU (the per-phase times of
    ``benchmarks/results/online_throughput.json`` show where a trainer's time goes).
    Output is identical to the wrapped tokenizer's: rows padded with 0 to the longest
    in the call.

    Parameters
    ----------
    base
        A fitted tokenizer; its state is shared, not copied.
    capacity
        Texts kept (least recently used dropped first).
    """

    def __init__(self, base: SubwordTokenizer, capacity: int = 200_000) -> None:
        # share the fitted state instead of reloading the WordPiece file
        self.__dict__.update(base.__dict__)
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._capacity = capacity

    def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
        cache = self._cache
        missing = list(dict.fromkeys(t for t in texts if (t, max_len) not in cache))
        if missing:
            ids, mask = super().encode_batch(missing, max_len)
            lengths = mask.sum(dim=1).tolist()
            for text, row, n in zip(missing, ids.numpy(), lengths, strict=True):
                cache[(text, max_len)] = row[:n].copy()
        rows = []
        for text in texts:
            key = (text, max_len)
            cache.move_to_end(key)
            rows.append(cache[key])
        while len(cache) > self._capacity:
            cache.popitem(last=False)
        width = max([len(r) for r in rows] + [1])
        out = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        ids_t = torch.from_numpy(out)
        return ids_t, (ids_t != self.PAD).long()
