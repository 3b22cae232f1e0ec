"""The online split: ranking lists for a user simulator and online learning.

A learner is trained online on feedback to these lists, so they must be new to
everything else a build writes; otherwise what it learns online would be
measured again, flattered, on test. So the split

* is mined from sources no other set reads: at ``small`` the stdlib modules of
  :data:`tasks.packages.SMALL_ONLINE_STDLIB` (no downloads), otherwise the
  wheels of :data:`tasks.packages.ONLINE_PINS`, which are in no other pin table;
* shares no group with train, valid, test or a guard set (an error if it does);
* drops every pair whose code or query another set holds (``seen_code`` and
  ``seen_summary`` in its mining stats), so no query of it was ever seen elsewhere;
* is not labelled by ``teacher precompute`` (which reads the splits and the guard
  sets only): the online learner gets feedback on it, not soft labels.

Otherwise it is built like a guard set: docstring -> function pairs mined as for
the splits (:func:`tasks.mine.mine`), queries capped per size by a seeded
subsample, a candidate pool of every gold plus at most ``POOL_CAPS`` other
functions, and gold + ``data.negatives`` BM25-hard and random negatives
(:func:`tasks.negatives.build_examples`). It is written beside the splits as
``online.jsonl``, outside ``data_hash``, so existing caches stay valid.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from codistill.config import DataSettings, Size
from codistill.ranking import RankingExample
from tasks.guards import cap_pool
from tasks.mine import Pair, mine
from tasks.negatives import build_examples
from tasks.packages import ONLINE_PINS, SMALL_ONLINE_STDLIB, Pin
from tasks.sources import chain_files, stdlib_files, wheel_files
from tasks.split import Split, cap_queries
from tasks.wheels import fetch_wheels

ONLINE = "online"
ONLINE_FILE = "online.jsonl"
QUERY_CAPS: dict[Size, int | None] = {"small": 100, "demo": 400, "full": None}
# Non-gold functions kept in the candidate pool; None keeps them all.
POOL_CAPS: dict[Size, int | None] = {"small": 1500, "demo": 2000, "full": None}
# Fewer lists make an online-learning curve noise; small only needs some.
MIN_ONLINE_QUERIES: dict[Size, int] = {"small": 1, "demo": 300, "full": 300}


class OnlineError(RuntimeError):
    """The online split cannot be built as configured."""


@dataclass
class OnlineSet:
    """The built online split, before it is written."""

    examples: list[RankingExample]
    sources: list[dict[str, Any]]
    stats: Counter[str] = field(default_factory=Counter)
    pool: list[Pair] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Queries, pool size, distinct candidates and groups, as the manifest records them."""
        return {
            "queries": len(self.examples),
            "pool": len(self.pool),
            "unique_candidates": len({c for ex in self.examples for c in ex.candidate_ids}),
            "groups": len({ex.meta["group"] for ex in self.examples}),
        }


def _label() -> Split:
    """The name candidates are seeded under (``tasks.negatives`` keys its randomness on it)."""
    return cast(Split, ONLINE)


def unseen(pairs: Sequence[Pair], seen_ids: Iterable[str], seen_queries: Iterable[str],
           stats: Counter[str]) -> list[Pair]:
    """The pairs whose code id and (case-folded) summary no other set holds, in order.

    Parameters
    ----------
    pairs
        Mined online pairs.
    seen_ids
        Candidate ids of every other set (its whole pool, not only its golds).
    seen_queries
        Query texts of every other set.
    stats
        Counts ``seen_code`` and ``seen_summary`` for the pairs dropped.

    Returns
    -------
    list[Pair]
        The pairs no other set could have shown a model.
    """
    ids, queries = set(seen_ids), {q.lower() for q in seen_queries}
    out = []
    for pair in pairs:
        if pair.cid in ids:
            stats["seen_code"] += 1
        elif pair.summary.lower() in queries:
            stats["seen_summary"] += 1
        else:
            out.append(pair)
    return out


def build_online(
    data: DataSettings,
    wheel_dir: Path,
    other_groups: Iterable[str],
    progress: bool = False,
    seen_ids: Iterable[str] = (),
    seen_queries: Iterable[str] = (),
) -> OnlineSet:
    """Mine and build the online split of ``data.size``.

    Parameters
    ----------
    data
        Size, seed and candidate-list settings (as for the splits).
    wheel_dir
        Cache of pinned wheels; the online pins are downloaded there at demo/full.
    other_groups
        Groups of train, valid, test and every guard set; sharing one is an error.
    progress
        Show progress bars.
    seen_ids, seen_queries
        Candidate ids and query texts of the other sets; pairs repeating one are dropped.

    Returns
    -------
    OnlineSet
        Its lists (``meta["split"] == "online"``), sources and mining stats.

    Raises
    ------
    OnlineError
        A group is shared with another set, or fewer queries than the size's floor
        (``MIN_ONLINE_QUERIES``) are left.
    """
    pins: list[Pin] = []
    if data.size == "small":
        files = stdlib_files(SMALL_ONLINE_STDLIB)
    else:
        pins = list(ONLINE_PINS)
        wheels = fetch_wheels(pins, wheel_dir)
        files = chain_files(*(wheel_files(wheels[p.name], p) for p in pins))
    mined = mine(files, progress=progress)
    stats = Counter(mined.stats)
    shared = sorted({p.group for p in mined.pairs} & set(other_groups))
    if shared:
        raise OnlineError(f"the online split shares groups with other sets: {shared}")
    pairs = unseen(mined.pairs, seen_ids, seen_queries, stats)
    stats["unseen_pairs"] = len(pairs)
    label = _label()
    queries = cap_queries(pairs, QUERY_CAPS[data.size], data.seed, label)
    floor = MIN_ONLINE_QUERIES[data.size]
    if len(queries) < floor:
        raise OnlineError(f"the online split needs >= {floor} queries at size {data.size!r} "
                          f"but got {len(queries)}; add online pins (tasks.packages)")
    pool = cap_pool(pairs, (q.cid for q in queries), POOL_CAPS[data.size], data.seed, label)
    examples = build_examples(queries, pool, label, data.negatives, data.hard_fraction,
                              data.seed, progress)
    per_source = Counter(q.source for q in queries)
    if pins:
        sources = [{"name": p.name, "version": p.version, "sha256": p.sha256,
                    "pairs": per_source[p.requirement]} for p in pins]
    else:
        sources = [{"name": "stdlib", "version": platform.python_version(), "sha256": "stdlib",
                    "modules": list(SMALL_ONLINE_STDLIB), "pairs": per_source["stdlib"]}]
    return OnlineSet(examples, sources, stats, pool)
