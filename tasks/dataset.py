"""The built data set of the configured size, as the other stages read it.

One place decides where a split lives (``HOME/data/SIZE/SPLIT.jsonl``), what a
missing build tells the user, and the label under which metrics on a split are
remembered (size, split and the first 12 hex digits of the data hash: a result
is reused only for exactly the same data). The online split (``online.jsonl``,
:func:`read_online`) is read here too, but has no metric label: it is for
online learning, never reported like valid or test.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from codistill.config import Settings
from codistill.ranking import RankingExample, read_ranking_file
from tasks.build import MANIFEST, load_manifest, load_split
from tasks.guards import file_name, guards_for
from tasks.online import ONLINE_FILE
from tasks.split import SPLITS, Split

__all__ = ["SPLITS", "built_guards", "guard_label", "manifest_data_hash", "metric_label",
           "read_guard", "read_online", "read_split", "split_path"]

log = logging.getLogger(__name__)


def split_path(settings: Settings, split: str) -> Path:
    """``HOME/data/SIZE/SPLIT.jsonl``; a missing file says how to build it."""
    path = settings.data_dir / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: build the data first with `codistill data build --size {settings.data.size}`"
        )
    return path


def read_split(settings: Settings, split: Split) -> list[RankingExample]:
    """The validated examples of one split of the configured data size."""
    split_path(settings, split)  # the helpful error first
    return load_split(settings.data_dir, split)


def manifest_data_hash(settings: Settings) -> str | None:
    """The ``data_hash`` the build recorded, or None before any build."""
    if not (settings.data_dir / MANIFEST).exists():
        return None
    return str(load_manifest(settings.data_dir)["data_hash"])


def metric_label(settings: Settings, split: str) -> str:
    """Key under which metrics on ``split`` are stored on teacher and student cards."""
    return f"{settings.data.size}/{split}@{(manifest_data_hash(settings) or 'nodata')[:12]}"


def built_guards(settings: Settings) -> list[str]:
    """The configured guard sets (``data.guard_sets``) that the build wrote, in that order.

    A configured guard missing from the build (data built before guard sets existed,
    or with other ``guard_sets``) is left out with a warning naming the rebuild.
    """
    manifest = (load_manifest(settings.data_dir)
                if (settings.data_dir / MANIFEST).exists() else {})
    built = manifest.get("guards", {})
    names = []
    for name in guards_for(settings.data):
        if name in built and (settings.data_dir / file_name(name)).exists():
            names.append(name)
        else:
            log.warning("guard set %s is not in %s: rebuild with `codistill data build "
                        "--size %s`", name, settings.data_dir, settings.data.size)
    return names


def read_guard(settings: Settings, name: str) -> list[RankingExample]:
    """The validated examples of one built guard set."""
    path = settings.data_dir / file_name(name)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: build the data first with `codistill data build --size {settings.data.size}`"
        )
    return read_ranking_file(path)


def guard_label(settings: Settings, name: str) -> str:
    """Card key of metrics on a guard set: size, guard name and the guard file's hash."""
    entry = load_manifest(settings.data_dir).get("guards", {}).get(name, {})
    return f"{settings.data.size}/guard_{name}@{entry.get('sha256', 'nodata')[:12]}"


def read_online(settings: Settings) -> list[RankingExample]:
    """The validated lists of the online split (``HOME/data/SIZE/online.jsonl``).

    For the user simulator and online learning only: no other split or guard set
    shares its code or queries, and ``teacher precompute`` does not label it.
    """
    path = settings.data_dir / ONLINE_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: build the data (again, if it predates the online split) with "
            f"`codistill data build --size {settings.data.size}`"
        )
    return read_ranking_file(path)


def read_unlabeled(settings: Settings, limit: int | None = None,
                   kinds: Sequence[str] | None = None) -> list[str]:
    """The first ``limit`` texts (of ``kinds``, default all) of ``HOME/data/SIZE/unlabeled.jsonl``
    (train groups only, ``tasks.unlabeled``).

    The file is in a seeded shuffled order, so a prefix is a sample of every kind.
    """
    from tasks.unlabeled import UNLABELED_FILE
    from tasks.unlabeled import read_unlabeled as read_file

    path = settings.data_dir / UNLABELED_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the data was built before unlabeled text existed; rebuild it "
            f"with `codistill data build --size {settings.data.size}` (data_hash stays the same)"
        )
    return [t.text for t in read_file(path, kinds)[:limit]]
