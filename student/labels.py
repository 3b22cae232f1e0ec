"""Reading the teacher's soft labels of a ranking set from the store."""

from __future__ import annotations

from collections.abc import Sequence

from codistill.ranking import RankingExample
from stores.base import SoftLabelRecord, Store

LABEL_CHUNK = 512  # query ids per get_labels call: one round trip per chunk, not per query


def read_labels(
    store: Store, version: str, examples: Sequence[RankingExample], chunk: int = LABEL_CHUNK
) -> list[SoftLabelRecord]:
    """The teacher's records for ``examples``, read in batches and checked against each list.

    Parameters
    ----------
    store : Store
        The store ``codistill teacher precompute`` wrote to.
    version : str
        Teacher version whose labels to read.
    examples : sequence of RankingExample
        The lists; each must have a record computed for exactly its candidate ids.
    chunk : int, default ``LABEL_CHUNK``
        Query ids per ``Store.get_labels`` call.

    Returns
    -------
    list of SoftLabelRecord
        One record per example, in the order of ``examples``.

    Raises
    ------
    LookupError
        If a query has no record, or its record was computed for another candidate
        list (the data changed since precompute).
    """
    records: list[SoftLabelRecord] = []
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        got = store.get_labels(version, [ex.query_id for ex in part])
        for ex, rec in zip(part, got, strict=True):
            if rec is None:
                raise LookupError(
                    f"teacher {version} has no soft labels for query {ex.query_id}: run "
                    "`codistill teacher precompute` on this data first"
                )
            if rec.candidate_ids != ex.candidate_ids:
                raise LookupError(
                    f"soft labels of query {ex.query_id} (teacher {version}) were computed for "
                    "another candidate list: the data changed since precompute; run it again"
                )
        records.extend(got)  # type: ignore[arg-type]  # None was ruled out above
    return records
