"""The built data set of the configured size, as the other stages read it.

One place decides where a split lives (``HOME/data/SIZE/SPLIT.jsonl``), what a
missing build tells the user, and the label under which metrics on a split are
remembered (size, split and the first 12 hex digits of the data hash: a result
is reused only for exactly the same data).
"""

from __future__ import annotations

from pathlib import Path

from codistill.config import Settings
from codistill.ranking import RankingExample
from tasks.build import MANIFEST, load_manifest, load_split
from tasks.split import SPLITS, Split

__all__ = ["SPLITS", "manifest_data_hash", "metric_label", "read_split", "split_path"]


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
