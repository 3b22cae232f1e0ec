"""Build a code-search ranking data set: sources -> pairs -> splits -> candidate lists.

The output directory holds ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` (the
project's ranking format), one ``guard_<name>.jsonl`` per guard set
(:mod:`tasks.guards`) and ``manifest.json``, which records everything needed
to rebuild the same bytes (sizes, seed, interpreter, pinned wheel hashes), a
``data_hash`` over the three split files so downstream caches can key on the data,
and under ``guards`` each guard file's sha256, counts and sources, with a
separate ``guards_hash`` over them (so adding guards left ``data_hash`` as it was).

``online.jsonl`` is the online split (:mod:`tasks.online`): lists for a user
simulator and online learning, from packages no other file mines, sharing no
group, code or query with the splits or guards. It is written after them and
recorded under ``online`` (file, sha256, counts, sources, mining), outside
``data_hash`` and ``guards_hash``: adding it changed no cache key.

``unlabeled.jsonl`` (:mod:`tasks.unlabeled`) holds text without labels from the
train groups only (code, docstring sentences, names, comments, left-over train
summaries) for the student's query tower; it too is outside ``data_hash``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from codistill.config import DataSettings
from codistill.fsio import atomic_write_text, sha256_file
from codistill.ranking import RankingExample, read_ranking_file, write_ranking_file
from tasks.guards import build_guards, file_name, guards_hash
from tasks.mine import mine
from tasks.negatives import build_examples
from tasks.online import ONLINE_FILE, build_online
from tasks.packages import SMALL_STDLIB, pins_for
from tasks.sources import (
    SourceFile,
    SourceInfo,
    chain_files,
    dir_files,
    dir_info,
    stdlib_files,
    wheel_files,
)
from tasks.split import QUERY_CAPS, SPLITS, Split, cap_queries, split_pairs
from tasks.unlabeled import CAPS as UNLABELED_CAPS
from tasks.unlabeled import UNLABELED_FILE, mine_unlabeled, write_unlabeled
from tasks.wheels import fetch_wheels

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "codistill-tasks/1"
# The demo job trains and evaluates on these; fewer held-out queries make its numbers noise.
MIN_HELD_OUT_QUERIES = {"demo": 300}


class DatasetError(RuntimeError):
    """The sources do not yield a usable data set of the requested size."""


def build_dataset(
    data: DataSettings,
    out_dir: Path,
    cache_dir: Path,
    extra_sources: Sequence[Path] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Build ``data.size`` into ``out_dir`` and return its manifest.

    Same settings, sources and interpreter -> byte-identical split files (and so
    the same ``data_hash``); only ``build_seconds`` differs between builds.
    """
    started = time.perf_counter()
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    extra = [Path(p) for p in extra_sources]
    for path in extra:
        if not path.is_dir():
            raise DatasetError(f"extra source is not a directory: {path}")

    stages: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name] = round(now - clock, 2)
        clock = now

    pins = pins_for(data.size)
    wheels = fetch_wheels(pins, cache_dir / "wheels")
    lap("fetch")
    infos = [SourceInfo("stdlib", platform.python_version(), "stdlib")]
    infos += [SourceInfo(p.name, p.version, p.sha256) for p in pins]
    infos += [dir_info(path) for path in extra]

    def files() -> Iterator[SourceFile]:
        return chain_files(
            stdlib_files(SMALL_STDLIB if data.size == "small" else None),
            *(wheel_files(wheels[pin.name], pin) for pin in pins),
            *(dir_files(path) for path in extra),
        )

    mined = mine(files(), progress=progress)
    log.info("mined %d pairs from %d files", len(mined.pairs), mined.stats["files"])
    lap("mine")

    pools = split_pairs(mined.pairs, data.seed, data.valid_fraction, data.test_fraction)
    caps = QUERY_CAPS[data.size]
    queries = {s: cap_queries(pools[s], caps[s], data.seed, s) for s in SPLITS}
    _check_sizes(data, queries, pools)
    lap("split")

    examples = {
        s: build_examples(
            queries[s], pools[s], s, data.negatives, data.hard_fraction, data.seed, progress
        )
        for s in SPLITS
    }
    lap("candidates")
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        write_ranking_file(out_dir / f"{s}.jsonl", examples[s])
    digest = data_hash(out_dir)
    lap("write")
    guards = build_guards(data, cache_dir / "wheels", (p.group for s in SPLITS for p in pools[s]),
                          progress)
    for stale in out_dir.glob("guard_*.jsonl"):
        if stale.name not in {file_name(g.name) for g in guards}:
            stale.unlink()
    guard_entries: dict[str, Any] = {}
    for guard in guards:
        path = out_dir / file_name(guard.name)
        write_ranking_file(path, guard.examples)
        guard_entries[guard.name] = {
            "file": path.name, "sha256": sha256_file(path), "counts": guard.counts(),
            "sources": guard.sources, "mining": dict(sorted(guard.stats.items())),
        }
    lap("guards")

    others = [p for s in SPLITS for p in pools[s]] + [
        p for guard in guards for pool in guard.pools for p in pool]
    guard_examples = [ex for guard in guards for ex in guard.examples]
    online = build_online(
        data, cache_dir / "wheels",
        {p.group for p in others} | {ex.meta["group"] for ex in guard_examples}, progress,
        seen_ids=[p.cid for p in others] + [c for ex in guard_examples for c in ex.candidate_ids],
        seen_queries=[p.summary for p in others] + [ex.query for ex in guard_examples],
    )
    online_path = out_dir / ONLINE_FILE
    write_ranking_file(online_path, online.examples)
    online_entry = {
        "file": online_path.name, "sha256": sha256_file(online_path), "counts": online.counts(),
        "sources": online.sources, "mining": dict(sorted(online.stats.items())),
    }
    lap("online")

    asked = {p.summary for p in queries["train"]}
    held = [*(ex for s in SPLITS for ex in examples[s]), *guard_examples, *online.examples]
    texts, unlabeled_stats = mine_unlabeled(
        files(), {p.group for p in pools["train"]},
        [p.summary for p in pools["train"] if p.summary not in asked],
        exclude=[t for ex in held for t in (ex.query, *ex.candidates)],
        cap=UNLABELED_CAPS[data.size], seed=data.seed)
    unlabeled_path = out_dir / UNLABELED_FILE
    write_unlabeled(unlabeled_path, texts)
    unlabeled_entry = {"file": unlabeled_path.name, "sha256": sha256_file(unlabeled_path),
                       "texts": len(texts), "mining": unlabeled_stats}
    lap("unlabeled")

    source_pairs = Counter(p.source for p in mined.pairs)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "size": data.size,
        "seed": data.seed,
        "negatives": data.negatives,
        "hard_fraction": data.hard_fraction,
        "valid_fraction": data.valid_fraction,
        "test_fraction": data.test_fraction,
        "query_caps": caps,
        "python": {"version": sys.version, "implementation": platform.python_implementation()},
        "sources": [
            {**vars(info), "pairs": source_pairs[_source_key(info)]} for info in infos
        ],
        "mining": dict(sorted(mined.stats.items())),
        "counts": {s: _counts(examples[s], pools[s]) for s in SPLITS},
        "groups": {s: sorted({p.group for p in pools[s]}) for s in SPLITS},
        "data_hash": digest,
        "guards": guard_entries,
        "guards_hash": guards_hash(guard_entries),
        "online": online_entry,
        "unlabeled": unlabeled_entry,
        "build_seconds": round(time.perf_counter() - started, 2),
        "stage_seconds": stages,
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _source_key(info: SourceInfo) -> str:
    """The ``Pair.source`` label of a manifest source entry."""
    if info.name == "stdlib" or info.name.startswith("extra:"):
        return info.name
    return f"{info.name}=={info.version}"


def _check_sizes(
    data: DataSettings, queries: dict[Split, list[Any]], pools: dict[Split, list[Any]]
) -> None:
    for s in SPLITS:
        if not queries[s] or len(pools[s]) < 2:
            raise DatasetError(
                f"split {s!r} got {len(pools[s])} pairs: too few groups/pairs for size "
                f"{data.size!r}; add sources or change the split fractions"
            )
    floor = MIN_HELD_OUT_QUERIES.get(data.size)
    if floor is not None:
        for s in ("valid", "test"):
            if len(queries[s]) < floor:
                raise DatasetError(
                    f"size {data.size!r} needs >= {floor} {s} queries but got {len(queries[s])}"
                )


def _counts(examples: Sequence[RankingExample], pool: Sequence[Any]) -> dict[str, int]:
    return {
        "queries": len(examples),
        "pool": len(pool),
        "unique_candidates": len({c for ex in examples for c in ex.candidate_ids}),
        "groups": len({p.group for p in pool}),
    }


def data_hash(out_dir: Path) -> str:
    """sha256 over the bytes of train, valid and test ``.jsonl``, in that order."""
    h = hashlib.sha256()
    for s in SPLITS:
        with open(Path(out_dir) / f"{s}.jsonl", "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_split(out_dir: Path, split: Split) -> list[RankingExample]:
    """The validated examples of one split of a built data set."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return read_ranking_file(Path(out_dir) / f"{split}.jsonl")


def load_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest written by :func:`build_dataset`."""
    return json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
