"""On-disk embedding cache keyed by (teacher version, exact text hash).

Candidates repeat across lists and across commands (evaluate, then precompute),
so every unique text is encoded once per teacher version. SQLite in WAL mode
keeps the cache safe to share between processes and survives interruption.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class EmbeddingCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # never share a connection across fork
            self._conn = sqlite3.connect(self.path, timeout=60)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS emb (version TEXT, h TEXT, vec BLOB, PRIMARY KEY(version, h))"
            )
            self._pid = os.getpid()
        return self._conn

    def get(self, version: str, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for i in range(0, len(hashes), 500):
            chunk = list(hashes[i : i + 500])
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT h, vec FROM emb WHERE version=? AND h IN ({marks})", [version, *chunk]
            )
            for h, blob in rows:
                found[h] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, version: str, hashes: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO emb VALUES (?, ?, ?)",
                [(version, h, vectors[i].tobytes()) for i, h in enumerate(hashes)],
            )

    def drop(self, version: str) -> int:
        """Forget every embedding of ``version`` (a benchmark measuring a cold start)."""
        with self.conn:
            return self.conn.execute("DELETE FROM emb WHERE version=?", [version]).rowcount

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
