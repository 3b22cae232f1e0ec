"""Split pairs into train / valid / test by *group*, then cap queries per split.

Splitting by module or package (never by function) keeps a package's helpers,
naming habits and copy-pasted code on one side, so valid/test measure
generalization to unseen code bases, as CodeSearchNet intends. Everything is
ordered by sha256 of the seed and a name, never by Python's randomized ``hash``,
so a build is reproducible across processes.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Literal

from codistill.config import Size
from tasks.mine import Pair

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")

# Queries kept per split; None = uncapped. Caps keep `small` fast for tests and
# `demo` inside the demo job's time budget.
QUERY_CAPS: dict[Size, dict[Split, int | None]] = {
    "small": {"train": 200, "valid": 60, "test": 60},
    "demo": {"train": 2000, "valid": 400, "test": 400},
    "full": {"train": None, "valid": None, "test": None},
}
# A group may overfill test/valid by this share of the target; bigger ones go to train
# so that one huge package cannot swallow a held-out split.
_OVERFILL = 0.1


def seeded_key(seed: int, name: str) -> str:
    """Stable pseudo-random sort key for ``name`` under ``seed``."""
    return hashlib.sha256(f"{seed}\0{name}".encode()).hexdigest()


def assign_groups(
    counts: Mapping[str, int], seed: int, valid_fraction: float, test_fraction: float
) -> dict[str, Split]:
    """Map every group to one split.

    Groups are visited in seeded order; each goes to test while test is below its
    share of all pairs, then to valid, else to train. A group that would push a
    held-out split more than ``_OVERFILL`` past its target is left for train.
    """
    total = sum(counts.values())
    targets = {"test": test_fraction * total, "valid": valid_fraction * total}
    filled = {"test": 0, "valid": 0}
    out: dict[str, Split] = {}
    for group in sorted(counts, key=lambda g: seeded_key(seed, g)):
        n = counts[group]
        out[group] = "train"
        for split in ("test", "valid"):
            room = targets[split] - filled[split]
            if room > 0 and n <= room + _OVERFILL * targets[split]:
                out[group] = split
                filled[split] += n
                break
    return out


def split_pairs(
    pairs: Sequence[Pair], seed: int, valid_fraction: float, test_fraction: float
) -> dict[Split, list[Pair]]:
    """All pairs of each split, in their mined order."""
    groups = assign_groups(Counter(p.group for p in pairs), seed, valid_fraction, test_fraction)
    out: dict[Split, list[Pair]] = {s: [] for s in SPLITS}
    for pair in pairs:
        out[groups[pair.group]].append(pair)
    return out


def cap_queries(pairs: Sequence[Pair], cap: int | None, seed: int, split: Split) -> list[Pair]:
    """A seeded subsample of at most ``cap`` pairs, kept in mined order."""
    if cap is None or len(pairs) <= cap:
        return list(pairs)
    ranked = sorted(range(len(pairs)), key=lambda i: seeded_key(seed, f"{split}\0{pairs[i].cid}"))
    return [pairs[i] for i in sorted(ranked[:cap])]
