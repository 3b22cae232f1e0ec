"""Guard sets: ranking files from another distribution than training.

A fine-tune can buy in-domain MRR with generalization; a guard set is where that
would show. Each is mined from sources no training split uses (guard pins in
:mod:`tasks.packages` are never training pins, at any size; at ``small`` the
prose guard reads stdlib modules the small splits do not mine) and gets the
splits' candidate lists: gold + ``data.negatives`` negatives, BM25 hard and
random (:func:`tasks.negatives.build_examples`).

* ``nl2code-prose`` (:mod:`tasks.prose`): usage prose -> the function it names.
* ``code2code-versions`` (:mod:`tasks.versions`): a function's code in one
  release -> the same function in the next pinned release.

Queries are capped per size (a seeded subsample, as for the splits), and each
candidate pool keeps every gold plus a seeded sample of at most ``POOL_CAPS``
other functions, so a guard costs a teacher about as much to encode as valid.
At ``small`` only ``nl2code-prose`` is built by default (no downloads);
``code2code-versions`` needs its wheels and is built there only when listed in
``data.guard_sets``.
"""

from __future__ import annotations

import hashlib
import platform
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from codistill.config import DataSettings, Size
from codistill.ranking import RankingExample
from tasks.mine import Pair
from tasks.negatives import build_examples
from tasks.packages import (
    GUARD_PINS,
    GUARD_PROSE_PACKAGES,
    GUARD_VERSION_PACKAGES,
    SMALL_GUARD_STDLIB,
    Pin,
    guard_pin,
)
from tasks.prose import mine_prose, wheel_prose
from tasks.sources import chain_files, stdlib_files, wheel_files
from tasks.split import Split, cap_queries, seeded_key
from tasks.versions import mine_versions
from tasks.wheels import fetch_wheels

PROSE, VERSIONS = "nl2code-prose", "code2code-versions"
GUARD_SETS: tuple[str, ...] = (PROSE, VERSIONS)
QUERY_CAPS: dict[Size, int | None] = {"small": 100, "demo": 400, "full": None}
# Non-gold functions kept per candidate pool (one pool per prose set, one per package
# in the version set); None keeps them all.
POOL_CAPS: dict[str, dict[Size, int | None]] = {
    PROSE: {"small": 1500, "demo": 2000, "full": None},
    VERSIONS: {"small": 600, "demo": 700, "full": None},
}
MIN_GUARD_QUERIES: dict[Size, int] = {"demo": 300}


class GuardError(RuntimeError):
    """A guard set cannot be built as configured."""


@dataclass
class GuardSet:
    """One built guard set, before it is written."""

    name: str
    examples: list[RankingExample]
    sources: list[dict[str, Any]]
    stats: Counter[str] = field(default_factory=Counter)
    pools: list[list[Pair]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "queries": len(self.examples),
            "pool": sum(len(p) for p in self.pools),
            "unique_candidates": len({c for ex in self.examples for c in ex.candidate_ids}),
            "groups": len({ex.meta["group"] for ex in self.examples}),
        }


def file_name(name: str) -> str:
    return f"guard_{name}.jsonl"


def guards_for(data: DataSettings) -> tuple[str, ...]:
    """The guard sets a build of ``data`` writes (``data.guard_sets``, else the size's default)."""
    if data.guard_sets is not None:
        names = tuple(data.guard_sets)
    else:
        names = (PROSE,) if data.size == "small" else GUARD_SETS
    unknown = sorted(set(names) - set(GUARD_SETS))
    if unknown:
        raise GuardError(f"unknown guard set(s) {unknown}; known: {list(GUARD_SETS)}")
    return names


def _label(name: str) -> Split:
    """The name candidates are seeded under (``tasks.negatives`` keys its randomness on it)."""
    return cast(Split, f"guard_{name}")


def cap_pool(pool: Sequence[Pair], golds: Iterable[str], cap: int | None, seed: int,
             label: str) -> list[Pair]:
    """Every gold plus a seeded sample of at most ``cap`` other pool items, in pool order."""
    gold = set(golds)
    if cap is None:
        return list(pool)
    others = sorted((i for i, p in enumerate(pool) if p.cid not in gold),
                    key=lambda i: seeded_key(seed, f"{label}\0pool\0{pool[i].cid}"))
    keep = set(others[:cap]) | {i for i, p in enumerate(pool) if p.cid in gold}
    return [pool[i] for i in sorted(keep)]


def _source(pin: Pin, pairs: int) -> dict[str, Any]:
    return {"name": pin.name, "version": pin.version, "sha256": pin.sha256, "pairs": pairs}


def build_prose(data: DataSettings, wheel_dir: Path, progress: bool = False) -> GuardSet:
    """``nl2code-prose``: stdlib modules at ``small``, the prose guard pins otherwise."""
    if data.size == "small":
        files, texts = stdlib_files(SMALL_GUARD_STDLIB), []
        pins: list[Pin] = []
    else:
        pins = [next(p for p in reversed(GUARD_PINS) if p.name == name)
                for name in GUARD_PROSE_PACKAGES]
        wheels = fetch_wheels(pins, wheel_dir)
        files = chain_files(*(wheel_files(wheels[p.name], p) for p in pins))
        texts = [t for p in pins for t in wheel_prose(wheels[p.name], p)]
    pairs, pool, stats = mine_prose(files, texts)
    label = _label(PROSE)
    queries = cap_queries(pairs, QUERY_CAPS[data.size], data.seed, label)
    pool = cap_pool(pool, (q.cid for q in queries), POOL_CAPS[PROSE][data.size], data.seed, label)
    examples = build_examples(queries, pool, label, data.negatives, data.hard_fraction,
                              data.seed, progress)
    per_source = Counter(q.source for q in queries)
    if pins:
        sources = [_source(p, per_source[p.requirement]) for p in pins]
    else:
        sources = [{"name": "stdlib", "version": platform.python_version(), "sha256": "stdlib",
                    "modules": list(SMALL_GUARD_STDLIB), "pairs": per_source["stdlib"]}]
    for ex in examples:
        ex.meta["guard"] = PROSE
    return GuardSet(PROSE, examples, sources, stats, [pool])


def build_versions(data: DataSettings, wheel_dir: Path, progress: bool = False) -> GuardSet:
    """``code2code-versions`` over every (package, older, newer) in the version guard pins."""
    label = _label(VERSIONS)
    mined: list[tuple[Pin, Pin, list[Pair], list[Pair]]] = []
    stats: Counter[str] = Counter()
    for name, old_v, new_v in GUARD_VERSION_PACKAGES:
        old, new = guard_pin(name, old_v), guard_pin(name, new_v)
        old_wheel = fetch_wheels([old], wheel_dir)[name]
        new_wheel = fetch_wheels([new], wheel_dir)[name]
        pairs, pool, st = mine_versions(wheel_files(old_wheel, old), wheel_files(new_wheel, new))
        stats.update(st)
        mined.append((old, new, pairs, pool))
    everything = [p for _, _, pairs, _ in mined for p in pairs]
    kept = {p.cid for p in cap_queries(everything, QUERY_CAPS[data.size], data.seed, label)}
    examples: list[RankingExample] = []
    pools: list[list[Pair]] = []
    sources: list[dict[str, Any]] = []
    for old, new, pairs, pool in mined:
        queries = [p for p in pairs if p.cid in kept]
        pool = cap_pool(pool, (q.cid for q in queries), POOL_CAPS[VERSIONS][data.size],
                        data.seed, f"{label}\0{new.name}")
        pools.append(pool)
        for ex in build_examples(queries, pool, label, data.negatives, data.hard_fraction,
                                 data.seed, progress):
            ex.meta.update(guard=VERSIONS, query_source=old.requirement)
            examples.append(ex)
        sources += [_source(old, len(queries)), _source(new, len(queries))]
    return GuardSet(VERSIONS, examples, sources, stats, pools)


BUILDERS = {PROSE: build_prose, VERSIONS: build_versions}


def build_guards(data: DataSettings, wheel_dir: Path, training_groups: Iterable[str],
                 progress: bool = False) -> list[GuardSet]:
    """Every configured guard set, checked against the training groups and the size floor."""
    train_groups = set(training_groups)
    out = []
    for name in guards_for(data):
        guard = BUILDERS[name](data, wheel_dir, progress)
        shared = sorted({ex.meta["group"] for ex in guard.examples} & train_groups)
        if shared:
            raise GuardError(f"guard {name!r} shares groups with the training splits: {shared}")
        floor = MIN_GUARD_QUERIES.get(data.size)
        if floor is not None and len(guard.examples) < floor:
            raise GuardError(f"guard {name!r} needs >= {floor} queries at size {data.size!r} "
                             f"but got {len(guard.examples)}")
        out.append(guard)
    return out


def guards_hash(entries: dict[str, dict[str, Any]]) -> str | None:
    """sha256 over (name, file sha256) of every guard set, in name order; None without any."""
    if not entries:
        return None
    h = hashlib.sha256()
    for name in sorted(entries):
        h.update(f"{name}\0{entries[name]['sha256']}\n".encode())
    return h.hexdigest()
