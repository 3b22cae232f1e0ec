"""Embedded event log: Kafka's data model on local disk, shared by processes, no server.

Layout under ``settings.path``::

    <topic>/topic.json          {"partitions": N}, written once (first creator wins)
    <topic>/<p>.log             frames: u32 length | u32 crc32(payload) | payload
    <topic>/<p>.idx             sparse index: (i64 offset, i64 byte position) every 64 records
    __codistill_groups/<g>.json committed offsets {topic: {partition: next_offset}}

payload = i64 timestamp_ms | i32 key length (-1 = no key) | key | value. Offsets are
record indices, as in Kafka. Why this shape:

* **Appends** happen under an exclusive ``fcntl.flock`` on the log, so several
  producer processes can share a partition; ``flush`` fsyncs.
* **Torn tails**: a writer killed mid-append leaves a frame whose length runs
  past the end of file or whose CRC does not match. Readers stop at the first
  such frame (they never return a partial record); the next writer, holding the
  lock (so no append is in flight), truncates it before appending.
* **Reads by offset** start from the nearest sparse-index entry (or the end of
  the previous read), so a read costs O(records returned + 64), not a scan
  of the file. The index is written after the data it points to; a writer that
  died in between leaves entries missing, which the next writer adds back.
* **Group offsets** are replaced atomically (tmp + fsync + rename + fsync dir):
  a crash leaves the old or the new commit, never a mix.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from codistill.fsio import atomic_write_json, fsync_path
from streaming.base import Record, StreamError, UnknownTopic
from streaming.partitioner import partition_for

FRAME = struct.Struct("<II")  # payload length, crc32(payload)
HEAD = struct.Struct("<qi")  # timestamp_ms, key length (-1: None)
INDEX = struct.Struct("<qq")  # offset, byte position of its frame
INDEX_INTERVAL = 64
MAX_PAYLOAD = 64 << 20  # a larger "length" can only be garbage
WRITE_BATCH_BYTES = 1 << 20  # buffered bytes per partition before an (unsynced) write
GROUPS_DIR = "__codistill_groups"
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def encode_frame(key: str | None, value: bytes, timestamp_ms: int) -> bytes:
    kb = b"" if key is None else key.encode("utf-8")
    payload = HEAD.pack(timestamp_ms, -1 if key is None else len(kb)) + kb + value
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _decode(topic: str, partition: int, offset: int, payload: bytes) -> Record:
    ts, klen = HEAD.unpack_from(payload)
    start = HEAD.size + max(klen, 0)
    key = None if klen < 0 else payload[HEAD.size : start].decode("utf-8")
    return Record(topic, partition, offset, key, payload[start:], ts)


def iter_frames(fd: int, pos: int, chunk: int = 16 << 10) -> Iterator[tuple[int, bytes]]:
    """Yield ``(position, payload)`` of consecutive valid frames from ``pos``.

    Stops silently at end of file, at a frame that runs past it (torn or still
    being written) and at a CRC mismatch: everything yielded is whole.
    """
    buf, base, off = b"", pos, 0
    while True:
        avail = len(buf) - off
        if avail < FRAME.size:
            more = os.pread(fd, chunk, base + len(buf))
            if not more:
                return
            buf, base, off = buf[off:] + more, base + off, 0
            chunk = min(chunk * 2, 4 << 20)
            continue
        length, crc = FRAME.unpack_from(buf, off)
        if length < HEAD.size or length > MAX_PAYLOAD:
            return
        need = FRAME.size + length
        if avail < need:
            more = os.pread(fd, max(chunk, need - avail), base + len(buf))
            if not more:
                return
            buf, base, off = buf[off:] + more, base + off, 0
            continue
        payload = buf[off + FRAME.size : off + need]
        if zlib.crc32(payload) != crc:
            return
        yield base + off, payload
        off += need


def _write_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


@dataclass
class _Partition:
    """Per-partition file handles and caches of known-valid frame boundaries."""

    log: Path
    idx: Path
    rfd: int | None = None
    wfd: int | None = None
    ifd: int | None = None
    index_offsets: list[int] = field(default_factory=list)
    index_positions: list[int] = field(default_factory=list)
    index_bytes: int = 0
    tail: tuple[int, int] = (0, 0)  # highest known (offset, byte position) boundary
    cursor: tuple[int, int] = (0, 0)  # end of the previous read (sequential reads are O(1))
    pending: list[bytes] = field(default_factory=list)
    pending_bytes: int = 0
    dirty: bool = False

    def read_fd(self) -> int | None:
        if self.rfd is None:
            try:
                self.rfd = os.open(self.log, os.O_RDONLY)
            except FileNotFoundError:
                return None
        return self.rfd

    def close(self) -> None:
        for fd in (self.rfd, self.wfd, self.ifd):
            if fd is not None:
                os.close(fd)
        self.rfd = self.wfd = self.ifd = None

    # -- reader side ---------------------------------------------------------------------
    def _load_index(self) -> None:
        """Read index entries appended since the last call (a torn last entry is ignored)."""
        try:
            with open(self.idx, "rb") as fh:
                fh.seek(self.index_bytes)
                data = fh.read()
        except FileNotFoundError:
            return
        usable = len(data) - len(data) % INDEX.size
        for off, pos in INDEX.iter_unpack(data[:usable]):
            if not self.index_offsets or off > self.index_offsets[-1]:
                self.index_offsets.append(off)
                self.index_positions.append(pos)
        self.index_bytes += usable

    def locate(self, offset: int) -> tuple[int, int]:
        """The known frame boundary (offset, position) closest below ``offset``."""
        if not self.index_offsets or offset >= self.index_offsets[-1] + INDEX_INTERVAL:
            self._load_index()
        best = (0, 0)
        if self.index_offsets:
            lo, hi = 0, len(self.index_offsets)
            while lo < hi:
                mid = (lo + hi) // 2
                if self.index_offsets[mid] <= offset:
                    lo = mid + 1
                else:
                    hi = mid
            if lo:
                best = (self.index_offsets[lo - 1], self.index_positions[lo - 1])
        for known in (self.tail, self.cursor):
            if best[0] < known[0] <= offset:
                best = known
        return best

    def note(self, offset: int, pos: int) -> None:
        if offset > self.tail[0]:
            self.tail = (offset, pos)


class EmbeddedStream:
    """The embedded backend of :class:`streaming.base.EventStream` (see the module docstring)."""

    def __init__(self, path: str | Path, topic: str = "codistill.events",
                 dlq_topic: str = "codistill.events.dlq", partitions: int = 4) -> None:
        self.path = Path(path)
        self.topic, self.dlq_topic, self.default_partitions = topic, dlq_topic, partitions
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._counts: dict[str, int] = {}

    # -- topics --------------------------------------------------------------------------
    def _topic_dir(self, topic: str) -> Path:
        if not _TOPIC_RE.match(topic) or topic in (".", "..") or topic == GROUPS_DIR:
            raise ValueError(f"invalid topic name {topic!r} (Kafka rules: [A-Za-z0-9._-]{{1,249}})")
        return self.path / topic

    def create_topic(self, topic: str, partitions: int) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        tdir = self._topic_dir(topic)
        meta = tdir / "topic.json"
        if meta.exists():
            return
        tdir.mkdir(parents=True, exist_ok=True)
        tmp = tdir / f".topic.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps({"partitions": partitions}))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, meta)  # fails if a concurrent creator won: theirs stands
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        fsync_path(tdir)
        fsync_path(self.path)

    def ensure_topics(self) -> None:
        self.create_topic(self.topic, self.default_partitions)
        self.create_topic(self.dlq_topic, self.default_partitions)

    def _partition_count(self, topic: str) -> int:
        n = self._counts.get(topic)
        if n is None:
            try:
                meta = json.loads((self._topic_dir(topic) / "topic.json").read_text())
            except FileNotFoundError:
                raise UnknownTopic(f"unknown topic {topic!r} in {self.path}") from None
            n = self._counts[topic] = int(meta["partitions"])
        return n

    def partitions(self, topic: str) -> list[int]:
        return list(range(self._partition_count(topic)))

    def _part(self, topic: str, partition: int) -> _Partition:
        p = self._parts.get((topic, partition))
        if p is None:
            n = self._partition_count(topic)
            if not 0 <= partition < n:
                raise ValueError(f"topic {topic!r} has partitions 0..{n - 1}, not {partition}")
            tdir = self._topic_dir(topic)
            p = self._parts[(topic, partition)] = _Partition(
                tdir / f"{partition}.log", tdir / f"{partition}.idx"
            )
        return p

    # -- producer side -------------------------------------------------------------------
    def send(self, topic: str, key: str, value: bytes) -> None:
        with self._lock:
            partition = partition_for(key, self._partition_count(topic))
            part = self._part(topic, partition)
            frame = encode_frame(key, bytes(value), time.time_ns() // 1_000_000)
            part.pending.append(frame)
            part.pending_bytes += len(frame)
            if part.pending_bytes >= WRITE_BATCH_BYTES:
                self._append(part)

    def flush(self) -> None:
        with self._lock:
            for part in self._parts.values():
                if part.pending:
                    self._append(part)
                if part.dirty:
                    assert part.wfd is not None and part.ifd is not None
                    os.fsync(part.wfd)
                    os.fsync(part.ifd)
                    part.dirty = False

    def _append(self, part: _Partition) -> None:
        """Write the partition's buffered frames under the exclusive lock (no fsync)."""
        if part.wfd is None:
            created = not part.log.exists()
            part.wfd = os.open(part.log, os.O_RDWR | os.O_CREAT, 0o644)
            part.ifd = os.open(part.idx, os.O_RDWR | os.O_CREAT, 0o644)
            if created:
                fsync_path(part.log.parent)
        fcntl.flock(part.wfd, fcntl.LOCK_EX)
        try:
            offset, pos = self._recover(part)
            data = b"".join(part.pending)
            _write_all(part.wfd, data, pos)
            entries = []
            for frame in part.pending:
                if offset % INDEX_INTERVAL == 0 and offset:
                    entries.append(INDEX.pack(offset, pos))
                offset, pos = offset + 1, pos + len(frame)
            if entries:
                self._append_index(part, entries)
            part.note(offset, pos)
            part.pending, part.pending_bytes, part.dirty = [], 0, True
        finally:
            fcntl.flock(part.wfd, fcntl.LOCK_UN)

    @staticmethod
    def _append_index(part: _Partition, entries: list[bytes]) -> None:
        assert part.ifd is not None
        size = os.fstat(part.ifd).st_size
        _write_all(part.ifd, b"".join(entries), size - size % INDEX.size)

    def _recover(self, part: _Partition) -> tuple[int, int]:
        """Under the lock: find the valid end (offset, position), truncating a torn tail.

        Starts from the last index entry or our cached tail, whichever is further, so
        it only scans what other writers appended since (at most a few batches).
        """
        assert part.wfd is not None and part.ifd is not None
        size = os.fstat(part.wfd).st_size
        isize = os.fstat(part.ifd).st_size
        if isize % INDEX.size:  # torn index entry from a crashed writer
            isize -= isize % INDEX.size
            os.ftruncate(part.ifd, isize)
        start, last_indexed = (part.tail if part.tail[1] <= size else (0, 0)), 0
        while isize:
            off, pos = INDEX.unpack(os.pread(part.ifd, INDEX.size, isize - INDEX.size))
            if pos < size and next(iter_frames(part.wfd, pos), None) is not None:
                last_indexed = off
                if off > start[0]:
                    start = (off, pos)
                break
            isize -= INDEX.size  # points past valid data (lost in an OS crash): drop it
            os.ftruncate(part.ifd, isize)
        if start[1] == size:
            return start
        offset, end, missing = start[0], start[1], []
        for pos, payload in iter_frames(part.wfd, start[1], chunk=1 << 20):
            if offset % INDEX_INTERVAL == 0 and offset > last_indexed:
                missing.append(INDEX.pack(offset, pos))
            offset, end = offset + 1, pos + FRAME.size + len(payload)
        if end < size:  # torn tail: no append is in flight (we hold the lock)
            os.ftruncate(part.wfd, end)
            os.fsync(part.wfd)
        if missing:
            self._append_index(part, missing)
        part.note(offset, end)
        return offset, end

    # -- reader side ---------------------------------------------------------------------
    def read(self, topic: str, partition: int, start_offset: int, max_records: int) -> list[Record]:
        if start_offset < 0 or max_records < 0:
            raise ValueError("start_offset and max_records must be >= 0")
        with self._lock:
            part = self._part(topic, partition)
            fd = part.read_fd()
            if fd is None or max_records == 0:
                return []
            offset, pos = part.locate(start_offset)
            out: list[Record] = []
            for fpos, payload in iter_frames(fd, pos):
                if offset >= start_offset:
                    out.append(_decode(topic, partition, offset, payload))
                offset, pos = offset + 1, fpos + FRAME.size + len(payload)
                if len(out) >= max_records:
                    break
            part.cursor = (offset, pos)
            part.note(offset, pos)
            return out

    def end_offset(self, topic: str, partition: int) -> int:
        with self._lock:
            part = self._part(topic, partition)
            fd = part.read_fd()
            if fd is None:
                return 0
            offset, pos = part.locate(1 << 62)
            for fpos, payload in iter_frames(fd, pos, chunk=1 << 20):
                offset, pos = offset + 1, fpos + FRAME.size + len(payload)
            part.note(offset, pos)
            return offset

    # -- consumer groups -----------------------------------------------------------------
    def _group_path(self, group: str, suffix: str) -> Path:
        if not group:
            raise ValueError("group must be a non-empty string")
        gdir = self.path / GROUPS_DIR
        gdir.mkdir(exist_ok=True)
        return gdir / (quote(group, safe="") + suffix)

    def committed(self, group: str, topic: str, partition: int) -> int | None:
        try:
            data = json.loads(self._group_path(group, ".json").read_text())
        except FileNotFoundError:
            return None
        value = data.get(topic, {}).get(str(partition))
        return None if value is None else int(value)

    def commit(self, group: str, topic: str, offsets: Mapping[int, int]) -> None:
        n = self._partition_count(topic)
        for p, off in offsets.items():
            if not 0 <= p < n or off < 0:
                raise ValueError(f"bad commit {topic}[{p}] = {off} (partitions 0..{n - 1})")
        path = self._group_path(group, ".json")
        with open(self._group_path(group, ".lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # read-modify-write across processes
            try:
                data = json.loads(path.read_text()) if path.exists() else {}
                data.setdefault(topic, {}).update({str(p): int(o) for p, o in offsets.items()})
                atomic_write_json(path, data)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def group_consumer(self, group: str, topics: list[str]) -> EmbeddedGroupConsumer:
        return EmbeddedGroupConsumer(self, group, topics)

    # -- misc ----------------------------------------------------------------------------
    def describe(self) -> str:
        return f"embedded:{self.path}"

    def close(self) -> None:
        with self._lock:
            try:
                self.flush()
            finally:
                for part in self._parts.values():
                    part.close()
                self._parts.clear()

    def __enter__(self) -> EmbeddedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmbeddedGroupConsumer:
    """A group consumer over the embedded log.

    The embedded log has no group coordinator, so a group has at most one member:
    a second consumer of the same group (any process) gets :class:`StreamError`
    rather than silently reading the same records twice.
    """

    def __init__(self, stream: EmbeddedStream, group: str, topics: list[str]) -> None:
        self._stream, self.group = stream, group
        self._member = open(stream._group_path(group, ".member"), "a+b")  # noqa: SIM115
        try:
            fcntl.flock(self._member.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._member.close()
            raise StreamError(f"embedded group {group!r} already has a consumer") from None
        self._positions: dict[tuple[str, int], int] = {}
        self._consumed: dict[tuple[str, int], int] = {}
        for topic in topics:
            for p in stream.partitions(topic):
                self._positions[(topic, p)] = stream.committed(group, topic, p) or 0
        self._order = sorted(self._positions)
        self._next = 0

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        while True:
            out: list[Record] = []
            for i in range(len(self._order)):  # round robin, so no partition starves
                tp = self._order[(self._next + i) % len(self._order)]
                recs = self._stream.read(tp[0], tp[1], self._positions[tp], max_records - len(out))
                if recs:
                    self._positions[tp] = self._consumed[tp] = recs[-1].offset + 1
                    out.extend(recs)
                if len(out) >= max_records:
                    break
            self._next = (self._next + 1) % max(len(self._order), 1)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))

    def commit(self) -> None:
        by_topic: dict[str, dict[int, int]] = {}
        for (topic, p), off in self._consumed.items():
            by_topic.setdefault(topic, {})[p] = off
        for topic, offsets in by_topic.items():
            self._stream.commit(self.group, topic, offsets)
        self._consumed.clear()

    def close(self) -> None:
        if not self._member.closed:
            fcntl.flock(self._member.fileno(), fcntl.LOCK_UN)
            self._member.close()

    def __enter__(self) -> EmbeddedGroupConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
