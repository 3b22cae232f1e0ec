"""Embedded event log: Kafka's data model on local disk, shared by processes, no server.

Layout under ``settings.path``::

    <topic>/topic.json          {"partitions": N}, written once (first creator wins)
    <topic>/<p>.log, .idx, .durable   one partition (:mod:`streaming.logfile`)
    __codistill_groups/<g>.json committed offsets {topic: {partition: next_offset}}

Offsets are record indices, as in Kafka. Why this shape:

* **Appends** happen under an exclusive ``fcntl.flock`` on the log, so several
  producer processes can share a partition. ``flush`` fsyncs and then publishes
  the partition's *durable end*; readers never see a record past it, so a record
  a reader (a trainer's checkpoint) has counted survives an OS crash, and no
  later record can take its offset (group commit: one fsync per flush).
* **Torn tails**: a writer killed mid-append leaves a frame past the durable end
  whose length runs past the end of file or whose CRC does not match. The next
  writer, holding the lock (so no append is in flight), truncates it.
* **Corruption**: a bad frame *before* the durable end means synced data was
  damaged. Every process CRC-checks each durable byte once before serving past
  it; a bad frame raises :class:`streaming.base.LogCorruption` (file, byte and
  record offset) for readers and writers alike, until ``repair`` truncates there.
* **Reads by offset** start from the nearest sparse-index entry (or the end of
  the previous read), so a read costs O(records returned + 64), not a scan
  of the file. The index is written after the data it points to; a writer that
  died in between leaves entries missing, which the next writer adds back.
* **Prefix removal** (:meth:`EmbeddedStream.delete_records`, Kafka's
  ``DeleteRecords``): a per-partition *log start* (``<p>.start``, replaced
  atomically) says which offset is the first one still served. Offsets never
  shift; a read below the start raises :class:`streaming.base.OffsetOutOfRange`
  (a reader by offset must never be served other records than it asked for). The
  bytes below the start stay in the file (the removal is logical: frames keep
  their record indices, and the CRC-verified scan needs every frame).
* **Group offsets** are replaced atomically (tmp + fsync + rename + fsync dir):
  a crash leaves the old or the new commit, never a mix.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from codistill.fsio import atomic_write_json, fsync_path, write_synced
from streaming.base import LogCorruption, OffsetOutOfRange, Record, UnknownTopic
from streaming.groups import EmbeddedGroupConsumer, group_path
from streaming.logfile import (
    FRAME,
    INDEX,
    INDEX_INTERVAL,
    FrameScan,
    Partition,
    decode_record,
    encode_frame,
)
from streaming.logfile import write_all as _write_all
from streaming.partitioner import partition_for

__all__ = ["INDEX", "INDEX_INTERVAL", "EmbeddedGroupConsumer", "EmbeddedStream", "RepairReport",
           "encode_frame"]

WRITE_BATCH_BYTES = 1 << 20  # buffered bytes per partition before an (unsynced) write
GROUPS_DIR = "__codistill_groups"
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass(frozen=True)
class RepairReport:
    """What ``EmbeddedStream.repair`` did to one partition."""

    topic: str
    partition: int
    kept: int  # records before the first bad frame
    dropped: int  # durable records lost (from the bad frame to the old durable end)
    truncated_bytes: int


class EmbeddedStream:
    """The embedded backend of :class:`streaming.base.EventStream` (see the module docstring)."""

    def __init__(self, path: str | Path, topic: str = "codistill.events",
                 dlq_topic: str = "codistill.events.dlq", partitions: int = 4) -> None:
        self.path = Path(path)
        self.topic, self.dlq_topic, self.default_partitions = topic, dlq_topic, partitions
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._parts: dict[tuple[str, int], Partition] = {}
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
        write_synced(tmp, json.dumps({"partitions": partitions}))
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

    def _part(self, topic: str, partition: int) -> Partition:
        p = self._parts.get((topic, partition))
        if p is None:
            n = self._partition_count(topic)
            if not 0 <= partition < n:
                raise ValueError(f"topic {topic!r} has partitions 0..{n - 1}, not {partition}")
            tdir = self._topic_dir(topic)
            p = self._parts[(topic, partition)] = Partition(
                tdir / f"{partition}.log", tdir / f"{partition}.idx", tdir / f"{partition}.durable"
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
        """Append what is buffered; it is durable and visible when this returns."""
        with self._lock:
            for part in self._parts.values():
                if part.pending:
                    self._append(part)

    def _open_for_write(self, part: Partition) -> None:
        if part.wfd is not None:
            return
        created = not part.log.exists()
        if created and not part.durable.exists():  # a new log has a durable end from its start
            part.write_durable(0, 0)
        part.wfd = os.open(part.log, os.O_RDWR | os.O_CREAT, 0o644)
        part.ifd = os.open(part.idx, os.O_RDWR | os.O_CREAT, 0o644)
        if created:
            fsync_path(part.log.parent)

    def _append(self, part: Partition) -> None:
        """Under the exclusive lock: write the buffered frames, fsync, publish the new end.

        Either the whole batch becomes durable and visible, or (an fsync failed) it is
        cut off the file again and stays buffered for the next ``flush``: no writer
        ever leaves unpublished bytes behind, so whatever lies past the durable end is
        the torn tail of a writer that died holding the lock.
        """
        self._open_for_write(part)
        assert part.wfd is not None and part.ifd is not None
        fcntl.flock(part.wfd, fcntl.LOCK_EX)
        try:
            start, start_pos = offset, pos = self._recover(part)
            isize = os.fstat(part.ifd).st_size
            _write_all(part.wfd, b"".join(part.pending), pos)
            entries = []
            for frame in part.pending:
                if offset % INDEX_INTERVAL == 0 and offset:
                    entries.append(INDEX.pack(offset, pos))
                offset, pos = offset + 1, pos + len(frame)
            if entries:
                self._append_index(part, entries)
            try:
                os.fsync(part.wfd)
                os.fsync(part.ifd)
            except OSError:
                os.ftruncate(part.wfd, start_pos)  # roll back: nothing unpublished stays
                os.ftruncate(part.ifd, isize)
                part.tail = (start, start_pos)
                raise
            part.write_durable(offset, pos)
            part.note(offset, pos)
            part.pending, part.pending_bytes = [], 0
        finally:
            fcntl.flock(part.wfd, fcntl.LOCK_UN)

    @staticmethod
    def _append_index(part: Partition, entries: list[bytes]) -> None:
        assert part.ifd is not None
        size = os.fstat(part.ifd).st_size
        _write_all(part.ifd, b"".join(entries), size - size % INDEX.size)

    def _recover(self, part: Partition) -> tuple[int, int]:
        """Under the lock: where the next frame goes, after cutting off a torn tail.

        The durable part is verified first (corruption there raises, so nothing is
        appended after damaged data); past the durable end lies only what a writer
        killed mid-append left, which is cut off with its index entries. A log from
        before durable ends existed is scanned to its last whole frame instead.
        """
        assert part.wfd is not None and part.ifd is not None
        size = os.fstat(part.wfd).st_size
        isize = os.fstat(part.ifd).st_size
        if isize % INDEX.size:  # torn index entry from a crashed writer
            isize -= isize % INDEX.size
            os.ftruncate(part.ifd, isize)
        durable = self._verified_end(part)
        if durable is not None:
            if size > durable[1]:
                os.ftruncate(part.wfd, durable[1])
                os.fsync(part.wfd)
            while isize:
                off, _ = INDEX.unpack(os.pread(part.ifd, INDEX.size, isize - INDEX.size))
                if off < durable[0]:
                    break
                isize -= INDEX.size
            if isize < os.fstat(part.ifd).st_size:
                os.ftruncate(part.ifd, isize)
            part.note(*durable)
            return durable
        return self._recover_legacy(part, size, isize)

    def _recover_legacy(self, part: Partition, size: int, isize: int) -> tuple[int, int]:
        """The valid end of a log without a durable end: its last whole frame."""
        assert part.wfd is not None and part.ifd is not None
        start, last_indexed = (part.tail if part.tail[1] <= size else (0, 0)), 0
        while isize:
            off, pos = INDEX.unpack(os.pread(part.ifd, INDEX.size, isize - INDEX.size))
            if pos < size and next(iter(FrameScan(part.wfd, pos)), None) is not None:
                last_indexed = off
                if off > start[0]:
                    start = (off, pos)
                break
            isize -= INDEX.size  # points past valid data (lost in an OS crash): drop it
            os.ftruncate(part.ifd, isize)
        if start[1] == size:
            return start
        offset, end, missing = start[0], start[1], []
        for pos, payload in FrameScan(part.wfd, start[1], chunk=1 << 20):
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
    def _verified_end(self, part: Partition, upto: int | None = None) -> tuple[int, int] | None:
        """The durable end, once the durable frames up to offset ``upto`` (default: all)
        passed their CRC check in this process (each byte is checked once).

        None for a log from before durable ends existed (it is served up to its first
        bad frame, as it always was). Raises :class:`LogCorruption` if a durable frame
        before ``upto`` is bad or missing.
        """
        durable = part.read_durable()
        fd = part.read_fd()
        if durable is None or fd is None:
            return durable
        upto = durable[0] if upto is None else min(upto, durable[0])
        offset, pos = part.verified
        if offset < upto:
            scan = FrameScan(fd, pos, limit=durable[1], chunk=1 << 20)
            for fpos, payload in scan:
                offset, pos = offset + 1, fpos + FRAME.size + len(payload)
                if offset >= upto:
                    break
            part.verified = (offset, pos)
            part.note(offset, pos)
            if offset < upto:
                what = {"eof": "the log ends before its durable end",
                        "short": "the log ends inside a durable record",
                        "bad": "bad length or checksum",
                        "limit": f"the durable end says offset {durable[0]} at byte {pos}"}
                raise LogCorruption(part.log, pos, offset, what[scan.stop])
        if offset == durable[0] and pos != durable[1]:
            raise LogCorruption(part.log, pos, offset,
                                f"the durable end says byte {durable[1]} for this offset")
        return durable

    def read(self, topic: str, partition: int, start_offset: int, max_records: int) -> list[Record]:
        if start_offset < 0 or max_records < 0:
            raise ValueError("start_offset and max_records must be >= 0")
        with self._lock:
            part = self._part(topic, partition)
            start = part.read_start()
            if start_offset < start:
                raise OffsetOutOfRange(topic, partition, start_offset, start, f" in {self.path}")
            fd = part.read_fd()
            if fd is None or max_records == 0:
                return []
            durable = self._verified_end(part, upto=start_offset + max_records)
            limit = None if durable is None else durable[1]
            if durable is not None and start_offset >= durable[0]:
                return []
            offset, pos = part.locate(start_offset)
            out: list[Record] = []
            for fpos, payload in FrameScan(fd, pos, limit=limit):
                if offset >= start_offset:
                    out.append(decode_record(topic, partition, offset, payload))
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
            durable = self._verified_end(part)
            if durable is not None:
                return durable[0]
            offset, pos = part.locate(1 << 62)  # a log from before durable ends
            for fpos, payload in FrameScan(fd, pos, chunk=1 << 20):
                offset, pos = offset + 1, fpos + FRAME.size + len(payload)
            part.note(offset, pos)
            return offset

    def start_offset(self, topic: str, partition: int) -> int:
        """The log start: the first offset still served (0 until :meth:`delete_records`)."""
        with self._lock:
            return self._part(topic, partition).read_start()

    def delete_records(self, topic: str, partition: int, before_offset: int) -> int:
        """Remove the records below ``before_offset`` (Kafka's ``DeleteRecords``).

        Offsets stay stable: the log start moves, nothing is renumbered. The start
        never moves back (an older ``before_offset`` is a no-op) and may not pass
        the end offset. Returns the log start now in force.
        """
        with self._lock:
            part = self._part(topic, partition)
            end = self.end_offset(topic, partition)
            if before_offset > end:
                raise ValueError(f"{topic}[{partition}]: cannot delete records before "
                                 f"{before_offset}, past the end offset {end}")
            if before_offset <= part.read_start():
                return part.read_start()
            self._open_for_write(part)
            assert part.wfd is not None
            fcntl.flock(part.wfd, fcntl.LOCK_EX)  # concurrent deleters: the start only grows
            try:
                start = max(part.read_start(), before_offset)
                atomic_write_json(part.start_file, {"start": int(start)})
            finally:
                fcntl.flock(part.wfd, fcntl.LOCK_UN)
            return start

    # -- repair --------------------------------------------------------------------------
    def repair(self, topic: str) -> list[RepairReport]:
        """Truncate every partition of ``topic`` at its first bad frame; republish its end.

        The explicit step after :class:`LogCorruption`: the records from the bad frame
        on are lost (restore the files from a backup instead to keep them). A partition
        without damage is left as it is (its unsynced tail becomes durable).
        """
        reports = []
        with self._lock:
            for p in self.partitions(topic):
                part = self._part(topic, p)
                if not part.log.exists():
                    continue
                self._open_for_write(part)
                assert part.wfd is not None and part.ifd is not None
                fcntl.flock(part.wfd, fcntl.LOCK_EX)
                try:
                    reports.append(self._repair_partition(topic, p, part))
                finally:
                    fcntl.flock(part.wfd, fcntl.LOCK_UN)
                    part.reset_caches()
        return reports

    def _repair_partition(self, topic: str, p: int, part: Partition) -> RepairReport:
        assert part.wfd is not None and part.ifd is not None
        try:
            durable = part.read_durable()
        except LogCorruption:
            durable = None  # rebuilt from the frames below
        size = os.fstat(part.wfd).st_size
        kept, end = 0, 0
        for fpos, payload in FrameScan(part.wfd, 0, chunk=1 << 20):
            kept, end = kept + 1, fpos + FRAME.size + len(payload)
        if end < size:
            os.ftruncate(part.wfd, end)
        entries = os.pread(part.ifd, os.fstat(part.ifd).st_size, 0)
        good = b"".join(INDEX.pack(o, q) for o, q in INDEX.iter_unpack(
            entries[: len(entries) - len(entries) % INDEX.size]) if o < kept and q < end)
        os.ftruncate(part.ifd, 0)
        _write_all(part.ifd, good, 0)
        os.fsync(part.wfd)
        os.fsync(part.ifd)
        part.write_durable(kept, end)
        dropped = max((durable[0] if durable else kept) - kept, 0)
        return RepairReport(topic, p, kept, dropped, size - end)

    # -- consumer groups -----------------------------------------------------------------
    def _group_path(self, group: str, suffix: str) -> Path:
        return group_path(self.path / GROUPS_DIR, group, suffix)

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
        return EmbeddedGroupConsumer(self, self._group_path(group, ".member"), group, topics)

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
