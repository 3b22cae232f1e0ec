"""Crash-safe file writes shared by every on-disk component (registries, logs, checkpoints).

A crash must leave either the old or the new file, never a torn one: write a
uniquely named temp file beside the target, fsync it, rename over the target,
then fsync the folder so the rename itself is durable.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (pinned wheels, model files, guards)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_digest(path: Path) -> str:
    """sha256 over the tensors of a safetensors file (names, dtypes, shapes, bytes).

    Not over the file: safetensors writes its metadata map in a per-process random
    order, so saving the same weights twice gives different file bytes. Student and
    teacher versions both derive from it.
    """
    import numpy as np
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="numpy") as fh:
        for name in sorted(fh.keys()):
            arr = fh.get_tensor(name)
            h.update(f"{name}|{arr.dtype.str}|{list(arr.shape)}|".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably."""
    atomic_write_lines(path, [text])


def atomic_write_lines(path: Path, chunks: Iterable[str]) -> int:
    """Replace ``path`` with the concatenated ``chunks`` (streamed, so files of any size);
    returns how many chunks were written."""
    path = Path(path)
    tmp = _tmp_beside(path)
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for chunk in chunks:
                fh.write(chunk)
                n += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return n


def write_synced(path: Path, data: str | bytes) -> None:
    """Write a new file inside a folder that will be published with :func:`publish_dir`."""
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def publish_dir(tmp: Path, final: Path) -> None:
    """Make a fully written folder appear at ``final`` in one rename, durably.

    Every file in ``tmp`` and ``tmp`` itself are fsynced first, so after a crash
    ``final`` either does not exist or holds every byte; ``final`` must not exist.
    """
    for path in sorted(Path(tmp).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)  # files first, then the folders holding them (deepest first)
    fsync_path(tmp)
    os.rename(tmp, final)
    fsync_path(Path(final).parent)


def atomic_write_json(path: Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, sort_keys=True))
