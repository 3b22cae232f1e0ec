"""Embedded store: one SQLite file, the default that needs no server.

Why SQLite in WAL mode: it is durable on local disk, several processes (a
teacher writing, students and servers reading) can share the file safely,
readers never block the writer, and a crash (even ``kill -9``) in the middle
of a write loses at most the uncommitted transaction, never half of one.
Every ``put_*`` call is one transaction, so a batch is either fully there or
not at all, and ``read_current_labels`` resolves the current version and reads
its labels inside one read transaction (one WAL snapshot).

Connections are opened lazily, one per thread and process: a connection must
not cross ``fork()`` (SQLite forbids it), so a pid change makes the child open
its own and leave the inherited ones untouched.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from stores.base import (
    Hold,
    SoftLabelRecord,
    StoreError,
    StoreUnavailable,
    VersionError,
    VersionInfo,
    check_resume,
    chunks,
    completed_info,
)
from stores.codec import (
    check_embeddings,
    check_record,
    check_version_name,
    decode_label,
    decode_vectors,
    encode_label,
    encode_vectors,
)

SCHEMA_VERSION = 4  # 2: seq columns (appends to complete versions); 3: pin ages, leases;
# 4: expiry deadlines (``store.ttl_s``)
DB_NAME = "store.sqlite"
_SQL_CHUNK = 500  # ids per "IN (...)": far below SQLite's variable limit
_PAGE = 1000  # ids per page of iter_candidate_ids: short read transactions

_SCHEMA = """
CREATE TABLE IF NOT EXISTS texts (id TEXT PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS embeddings (
    version TEXT NOT NULL, id TEXT NOT NULL, vec BLOB NOT NULL, seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (version, id));
CREATE TABLE IF NOT EXISTS labels (
    version TEXT NOT NULL, query_id TEXT NOT NULL, rec BLOB NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (version, query_id));
CREATE TABLE IF NOT EXISTS versions (version TEXT PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pointers (name TEXT PRIMARY KEY, version TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pins (
    version TEXT NOT NULL, consumer TEXT NOT NULL, created_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (version, consumer));
CREATE TABLE IF NOT EXISTS leases (
    version TEXT NOT NULL, owner TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (version, owner));
CREATE TABLE IF NOT EXISTS expiring (version TEXT PRIMARY KEY, deadline REAL NOT NULL);
"""

# Connections inherited over fork(): kept referenced so the child never closes them
# (closing would touch the parent's locks and WAL index).
_INHERITED: list[sqlite3.Connection] = []


class EmbeddedStore:
    """SQLite-backed :class:`stores.base.Store` at ``root / "store.sqlite"``."""

    def __init__(self, root: str | Path, *, timeout_s: float = 30.0,
                 ttl_s: float | None = None) -> None:
        self.root = Path(root)
        self.ttl_s = ttl_s
        self.db_path = self.root / DB_NAME
        self._timeout_s = timeout_s
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._generation = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create store directory {self.root}: {exc}") from exc
        self._init_schema()

    # ------------------------------------------------------------------ plumbing
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.db_path, timeout=self._timeout_s, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self._timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed batch also survives power loss, at one fsync per transaction.
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection in this process, opened on first use."""
        if os.getpid() != self._pid:
            _INHERITED.extend(self._conns)
            self._pid, self._lock, self._conns = os.getpid(), threading.Lock(), []
            self._local = threading.local()
        local = self._local
        if getattr(local, "generation", None) != self._generation or local.conn is None:
            local.conn = self._connect()
            local.generation = self._generation
            with self._lock:
                self._conns.append(local.conn)
        return local.conn

    @contextmanager
    def _tx(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction; ``write`` takes the write lock up front (no upgrade deadlocks)."""
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            msg = str(exc)
            if "locked" in msg or "busy" in msg or "unable to open" in msg:
                raise StoreUnavailable(f"SQLite store at {self.db_path}: {msg}") from exc
            raise StoreError(f"SQLite store at {self.db_path}: {msg}") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"SQLite store at {self.db_path}: {exc}") from exc

    def _init_schema(self) -> None:
        with self._tx(write=True) as conn:
            (found,) = conn.execute("PRAGMA user_version").fetchone()
            if found > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.db_path} has schema {found}; this code knows {SCHEMA_VERSION}"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if found == 1:  # a store written before appends: every record is sequence 0
                for table in ("embeddings", "labels"):
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
            if found in (1, 2):  # pins from before pin ages: age unknown (0 = the epoch)
                conn.execute("ALTER TABLE pins ADD COLUMN created_at REAL NOT NULL DEFAULT 0")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    def _info(conn: sqlite3.Connection, version: str) -> VersionInfo | None:
        row = conn.execute("SELECT info FROM versions WHERE version = ?", (version,)).fetchone()
        return None if row is None else VersionInfo.model_validate_json(row[0])

    def _require(self, conn: sqlite3.Connection, version: str) -> VersionInfo:
        info = self._info(conn, version)
        if info is None:
            raise VersionError(f"unknown teacher version {version!r} in {self.db_path}")
        return info

    @staticmethod
    def _current(conn: sqlite3.Connection) -> str | None:
        row = conn.execute("SELECT version FROM pointers WHERE name = 'current'").fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _select(
        conn: sqlite3.Connection, sql: str, version: str, ids: Sequence[str],
        max_seq: int | None = None,
    ) -> dict[str, bytes]:
        """Run ``sql`` (``{marks}`` for the id list) over id chunks; id -> 2nd column.

        With ``max_seq``, rows appended after that sequence number are left out.
        """
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(ids))
        tail = () if max_seq is None else (max_seq,)
        if max_seq is not None:
            sql += " AND seq <= ?"
        for chunk in chunks(unique, _SQL_CHUNK):
            marks = ",".join("?" * len(chunk))
            found.update(conn.execute(sql.format(marks=marks), (version, *chunk, *tail)).fetchall())
        return found

    def _insert(
        self, conn: sqlite3.Connection, table: str, key: str, version: str,
        rows: Sequence[tuple[str, bytes]],
    ) -> int:
        """Write ``(id, blob)`` rows of one version; see :class:`stores.base.CandidateStore`."""
        info = self._require(conn, version)
        column = "vec" if table == "embeddings" else "rec"
        if info.status == "writing":
            conn.executemany(f"INSERT OR REPLACE INTO {table} (version, {key}, {column}) "
                             "VALUES (?, ?, ?)", ((version, i, b) for i, b in rows))
            return len(rows)
        present = self._select(conn, f"SELECT {key}, 1 FROM {table} WHERE version = ? AND "
                               f"{key} IN ({{marks}})", version, [i for i, _ in rows])
        new = [(i, b) for i, b in dict(rows).items() if i not in present]
        seq = info.sequence
        conn.executemany(f"INSERT INTO {table} (version, {key}, {column}, seq) VALUES (?, ?, ?, ?)",
                         ((version, i, b, seq + n) for n, (i, b) in enumerate(new, start=1)))
        if new:
            counts = {**info.counts, table: info.counts.get(table, 0) + len(new)}
            grown = info.model_copy(update={"sequence": seq + len(new), "counts": counts})
            conn.execute("UPDATE versions SET info = ? WHERE version = ?",
                         (grown.model_dump_json(), version))
        return len(new)

    # ------------------------------------------------------------------ candidates
    def put_texts(self, texts: Mapping[str, str]) -> None:
        with self._tx(write=True) as conn:
            conn.executemany(
                "INSERT INTO texts (id, text) VALUES (?, ?) "
                "ON CONFLICT(id) DO UPDATE SET text = excluded.text",
                texts.items(),
            )

    def get_texts(self, ids: Sequence[str]) -> list[str | None]:
        found: dict[str, str] = {}
        with self._tx(write=False) as conn:
            for chunk in chunks(list(dict.fromkeys(ids)), _SQL_CHUNK):
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT id, text FROM texts WHERE id IN ({marks})"
                found.update(conn.execute(sql, tuple(chunk)).fetchall())
        return [found.get(i) for i in ids]

    def put_embeddings(self, version: str, ids: Sequence[str], embeddings: np.ndarray) -> int:
        info = self.get_version(version)
        if info is None:
            raise VersionError(f"unknown teacher version {version!r} in {self.db_path}")
        check_embeddings(version, info.dim, ids, embeddings)
        blobs = encode_vectors(embeddings, info.embedding_dtype)
        with self._tx(write=True) as conn:
            return self._insert(conn, "embeddings", "id", version,
                                list(zip(ids, blobs, strict=True)))

    def get_embeddings(self, version: str, ids: Sequence[str], max_seq: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        with self._tx(write=False) as conn:
            info = self._require(conn, version)
            sql = "SELECT id, vec FROM embeddings WHERE version = ? AND id IN ({marks})"
            found = self._select(conn, sql, version, ids, max_seq)
        return decode_vectors([found.get(i) for i in ids], info.dim)

    def has_embeddings(self, version: str, ids: Sequence[str], max_seq: int | None = None
                       ) -> np.ndarray:
        return self._has("embeddings", "id", version, ids, max_seq)

    def _has(self, table: str, column: str, version: str, ids: Sequence[str],
             max_seq: int | None) -> np.ndarray:
        sql = f"SELECT {column}, 1 FROM {table} WHERE version = ? AND {column} IN ({{marks}})"
        with self._tx(write=False) as conn:
            found = self._select(conn, sql, version, ids, max_seq)
        return np.fromiter((i in found for i in ids), dtype=bool, count=len(ids))

    def iter_candidate_ids(self, version: str) -> Iterator[str]:
        """Ids in sorted order, paged so no read transaction stays open between pages."""
        last = ""
        while True:
            with self._tx(write=False) as conn:
                rows = conn.execute(
                    "SELECT id FROM embeddings WHERE version = ? AND id > ? ORDER BY id LIMIT ?",
                    (version, last, _PAGE),
                ).fetchall()
            yield from (r[0] for r in rows)
            if len(rows) < _PAGE:
                return
            last = rows[-1][0]

    # ------------------------------------------------------------------ labels
    def put_labels(self, records: Sequence[SoftLabelRecord]) -> int:
        rows = self._encode_records(records)
        written = 0
        with self._tx(write=True) as conn:  # every version's rows in one transaction
            for version in dict.fromkeys(r[0] for r in rows):
                mine = [(q, b) for v, q, b in rows if v == version]
                written += self._insert(conn, "labels", "query_id", version, mine)
        return written

    def _encode_records(self, records: Iterable[SoftLabelRecord]) -> list[tuple[str, str, bytes]]:
        infos: dict[str, VersionInfo] = {}
        rows = []
        for rec in records:
            info = infos.get(rec.teacher_version) or self.get_version(rec.teacher_version)
            if info is None:
                raise VersionError(f"unknown teacher version {rec.teacher_version!r}")
            infos[rec.teacher_version] = info
            check_record(rec, info.dim, info.logit_scale)
            rows.append(
                (rec.teacher_version, rec.query_id, encode_label(rec, info.embedding_dtype))
            )
        return rows

    def get_labels(self, version: str, query_ids: Sequence[str], max_seq: int | None = None
                   ) -> list[SoftLabelRecord | None]:
        with self._tx(write=False) as conn:
            found = self._select(conn, self._LABELS_SQL, version, query_ids, max_seq)
        return self._decode_labels(found, query_ids)

    _LABELS_SQL = "SELECT query_id, rec FROM labels WHERE version = ? AND query_id IN ({marks})"

    @staticmethod
    def _decode_labels(
        found: Mapping[str, bytes], query_ids: Sequence[str]
    ) -> list[SoftLabelRecord | None]:
        decoded = {q: decode_label(blob) for q, blob in found.items()}
        return [decoded.get(q) for q in query_ids]

    def has_labels(self, version: str, query_ids: Sequence[str], max_seq: int | None = None
                   ) -> np.ndarray:
        return self._has("labels", "query_id", version, query_ids, max_seq)

    # ------------------------------------------------------------------ manifest
    def begin_version(self, info: VersionInfo) -> None:
        check_version_name(info.teacher_version)
        with self._tx(write=True) as conn:
            existing = self._info(conn, info.teacher_version)
            if existing is None:
                conn.execute("INSERT INTO versions (version, info) VALUES (?, ?)",
                             (info.teacher_version, info.model_dump_json()))
                return
        check_resume(existing, info)

    def complete_version(self, version: str, counts: Mapping[str, int] | None = None) -> None:
        with self._tx(write=True) as conn:
            info = self._require(conn, version)
            measured = {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE version = ?",
                                        (version,)).fetchone()[0]
                        for t in ("embeddings", "labels")}
            done = completed_info(info, measured, counts)
            conn.execute("UPDATE versions SET info = ? WHERE version = ?",
                         (done.model_dump_json(), version))

    def get_version(self, version: str) -> VersionInfo | None:
        with self._tx(write=False) as conn:
            return self._info(conn, version)

    def versions(self) -> list[VersionInfo]:
        with self._tx(write=False) as conn:
            rows = conn.execute("SELECT info FROM versions").fetchall()
        infos = [VersionInfo.model_validate_json(r[0]) for r in rows]
        return sorted(infos, key=lambda i: (i.created_at, i.teacher_version))

    def set_current(self, version: str) -> None:
        with self._tx(write=True) as conn:
            info = self._require(conn, version)
            if info.status != "complete":
                raise VersionError(f"version {version!r} is {info.status}; only a complete one "
                                   "can become current")
            conn.execute("INSERT INTO pointers (name, version) VALUES ('current', ?) "
                         "ON CONFLICT(name) DO UPDATE SET version = excluded.version", (version,))
            self._keep(conn, version)

    def current(self) -> str | None:
        with self._tx(write=False) as conn:
            return self._current(conn)

    def pin(self, version: str, consumer: str) -> None:
        with self._tx(write=True) as conn:
            self._require(conn, version)
            conn.execute("INSERT OR IGNORE INTO pins (version, consumer, created_at) "
                         "VALUES (?, ?, ?)", (version, consumer, time.time()))
            self._keep(conn, version)

    def unpin(self, version: str, consumer: str) -> None:
        with self._tx(write=True) as conn:
            conn.execute("DELETE FROM pins WHERE version = ? AND consumer = ?", (version, consumer))

    def pins(self, version: str) -> set[str]:
        with self._tx(write=False) as conn:
            rows = conn.execute("SELECT consumer FROM pins WHERE version = ?", (version,))
            return {r[0] for r in rows}

    def lease(self, version: str, owner: str, ttl_s: float) -> Hold:
        now = time.time()
        with self._tx(write=True) as conn:
            self._require(conn, version)
            row = conn.execute("SELECT created_at, expires_at FROM leases WHERE version = ? AND "
                               "owner = ?", (version, owner)).fetchone()
            created = row[0] if row is not None and row[1] > now else now
            conn.execute("INSERT OR REPLACE INTO leases (version, owner, created_at, expires_at) "
                         "VALUES (?, ?, ?, ?)", (version, owner, created, now + ttl_s))
            self._keep(conn, version)
        return Hold(version=version, kind="lease", owner=owner, created_at=created,
                    expires_at=now + ttl_s)

    def release(self, version: str, owner: str) -> None:
        with self._tx(write=True) as conn:
            conn.execute("DELETE FROM leases WHERE version = ? AND owner = ?", (version, owner))

    def holds(self, version: str) -> list[Hold]:
        with self._tx(write=True) as conn:
            conn.execute("DELETE FROM leases WHERE version = ? AND expires_at <= ?",
                         (version, time.time()))
            pins = conn.execute("SELECT consumer, created_at FROM pins WHERE version = ?",
                                (version,)).fetchall()
            leases = conn.execute("SELECT owner, created_at, expires_at FROM leases WHERE "
                                  "version = ?", (version,)).fetchall()
        return ([Hold(version=version, kind="pin", owner=o, created_at=c) for o, c in pins]
                + [Hold(version=version, kind="lease", owner=o, created_at=c, expires_at=e)
                   for o, c, e in leases])

    def delete_version(self, version: str) -> None:
        """Delete a version's data and manifest entry; a no-op for an unknown version."""
        with self._tx(write=True) as conn:
            if self._current(conn) == version:
                raise VersionError(f"version {version!r} is current; it cannot be deleted")
            pins = [r[0] for r in conn.execute("SELECT consumer FROM pins WHERE version = ?",
                                               (version,))]
            if pins:
                raise VersionError(f"version {version!r} is pinned by {sorted(pins)}")
            leased = [r[0] for r in conn.execute(
                "SELECT owner FROM leases WHERE version = ? AND expires_at > ?",
                (version, time.time()))]
            if leased:
                raise VersionError(f"version {version!r} is leased by {', '.join(sorted(leased))}")
            self._drop(conn, version)

    @staticmethod
    def _drop(conn: sqlite3.Connection, version: str) -> None:
        for table in ("embeddings", "labels", "leases", "expiring", "versions"):
            conn.execute(f"DELETE FROM {table} WHERE version = ?", (version,))

    @staticmethod
    def _keep(conn: sqlite3.Connection, version: str) -> None:
        """A version that became current, pinned or leased loses its expiry deadline."""
        conn.execute("DELETE FROM expiring WHERE version = ?", (version,))

    # ------------------------------------------------------------------ TTL
    def expire_stale_versions(self) -> list[str]:
        """One sweep (a no-op without ``ttl_s``): a complete version that is neither
        current, pinned nor leased gets the deadline now + ``ttl_s`` (the first one
        given stays), and one past its deadline is deleted, all in one transaction.
        Returns the versions that carry a deadline after the sweep."""
        if not self.ttl_s:
            return []
        now = time.time()
        with self._tx(write=True) as conn:
            held = {r[0] for r in conn.execute(
                "SELECT version FROM pointers WHERE name = 'current' UNION SELECT version "
                "FROM pins UNION SELECT version FROM leases WHERE expires_at > ?", (now,))}
            for version, raw in conn.execute("SELECT version, info FROM versions").fetchall():
                if version in held:
                    self._keep(conn, version)
                elif VersionInfo.model_validate_json(raw).status == "complete":
                    conn.execute("INSERT OR IGNORE INTO expiring (version, deadline) "
                                 "VALUES (?, ?)", (version, now + self.ttl_s))
            for (version,) in conn.execute("SELECT version FROM expiring WHERE deadline <= ?",
                                           (now,)).fetchall():
                self._drop(conn, version)
            return sorted(r[0] for r in conn.execute("SELECT version FROM expiring"))

    def expiring(self) -> dict[str, float]:
        """Versions given a deadline by :meth:`expire_stale_versions`: unix seconds."""
        with self._tx(write=False) as conn:
            return dict(conn.execute("SELECT version, deadline FROM expiring").fetchall())

    def read_current_labels(
        self, query_ids: Sequence[str]
    ) -> tuple[str, list[SoftLabelRecord | None]]:
        with self._tx(write=False) as conn:  # one snapshot: pointer and labels agree
            version = self._current(conn)
            if version is None:
                raise VersionError(f"no current version in {self.db_path}")
            found = self._select(conn, self._LABELS_SQL, version, query_ids)
        return version, self._decode_labels(found, query_ids)

    # ------------------------------------------------------------------ lifecycle
    def describe(self) -> str:
        return f"sqlite://{self.db_path.resolve()} (embedded)"

    def close(self) -> None:
        """Close this process's connections; the store reopens lazily if used again."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            conns, self._conns = self._conns, []
            self._generation += 1
        for conn in conns:
            conn.close()

    def __enter__(self) -> EmbeddedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
