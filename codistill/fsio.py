"""Crash-safe file writes shared by every on-disk component (registries, logs, checkpoints).

A crash must leave either the old or the new file, never a torn one: write a
uniquely named temp file beside the target, fsync it, rename over the target,
then fsync the folder so the rename itself is durable.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_json(path: Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, sort_keys=True))
