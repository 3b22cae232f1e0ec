"""One partition of the embedded log on disk: frames, the sparse index, the durable end.

Files of partition ``p`` of a topic::

    <p>.log      frames: u32 length | u32 crc32(payload) | payload
    <p>.idx      sparse index: (i64 offset, i64 byte position) every ``INDEX_INTERVAL`` records
    <p>.durable  the durable end: i64 offset | i64 byte position | u32 crc32 of the 16 bytes
    <p>.start    the log start (a removed prefix): ``{"start": offset}``; absent = 0

payload = i64 timestamp_ms | i32 key length (-1 = no key) | key | value.

The durable end is what makes "a reader sees only fsynced records" true: a writer
publishes it only after the log (and index) were fsynced, and fsyncs it too, so
it never points past synced data. Everything before it is *durable*: a bad frame
there is corruption (:class:`streaming.base.LogCorruption`); bytes after it are an
unsynced or torn tail, which the next writer checks and, if torn, truncates.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from streaming.base import LogCorruption, Record

FRAME = struct.Struct("<II")  # payload length, crc32(payload)
HEAD = struct.Struct("<qi")  # timestamp_ms, key length (-1: None)
INDEX = struct.Struct("<qq")  # offset, byte position of its frame
DURABLE = struct.Struct("<qqI")  # offset, byte position, crc32 of the first 16 bytes
INDEX_INTERVAL = 64
MAX_PAYLOAD = 64 << 20  # a larger "length" can only be garbage


def encode_frame(key: str | None, value: bytes, timestamp_ms: int) -> bytes:
    """One record as a frame.

    >>> frame = encode_frame("k", b"v", 0)
    >>> len(frame) == FRAME.size + HEAD.size + 2
    True
    """
    kb = b"" if key is None else key.encode("utf-8")
    payload = HEAD.pack(timestamp_ms, -1 if key is None else len(kb)) + kb + value
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def decode_record(topic: str, partition: int, offset: int, payload: bytes) -> Record:
    ts, klen = HEAD.unpack_from(payload)
    start = HEAD.size + max(klen, 0)
    key = None if klen < 0 else payload[HEAD.size : start].decode("utf-8")
    return Record(topic, partition, offset, key, payload[start:], ts)


class FrameScan:
    """Consecutive whole frames from byte ``pos``, as ``(position, payload)``.

    Stops at end of file, at ``limit`` (a byte position that must be a frame
    boundary), at a frame that runs past the file or the limit, and at a frame
    whose length is impossible or whose CRC does not match; everything yielded is
    whole. Afterwards ``stop`` says why (``eof``, ``limit``, ``short``, ``bad``) and
    ``end`` is the position after the last frame yielded.
    """

    def __init__(self, fd: int, pos: int, limit: int | None = None, chunk: int = 16 << 10
                 ) -> None:
        self.fd, self.pos, self.limit, self.chunk = fd, pos, limit, chunk
        self.stop = ""
        self.end = pos

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        fd, limit, chunk = self.fd, self.limit, self.chunk
        buf, base, off = b"", self.pos, 0
        while True:
            if limit is not None and base + off >= limit:
                self.stop = "limit" if base + off == limit else "bad"
                return
            avail = len(buf) - off
            if avail < FRAME.size:
                more = os.pread(fd, chunk, base + len(buf))
                if not more:
                    self.stop = "eof" if avail == 0 else "short"
                    return
                buf, base, off = buf[off:] + more, base + off, 0
                chunk = min(chunk * 2, 4 << 20)
                continue
            length, crc = FRAME.unpack_from(buf, off)
            need = FRAME.size + length
            if length < HEAD.size or length > MAX_PAYLOAD or (
                    limit is not None and base + off + need > limit):
                self.stop = "bad"
                return
            if avail < need:
                more = os.pread(fd, max(chunk, need - avail), base + len(buf))
                if not more:
                    self.stop = "short"
                    return
                buf, base, off = buf[off:] + more, base + off, 0
                continue
            payload = buf[off + FRAME.size : off + need]
            if zlib.crc32(payload) != crc:
                self.stop = "bad"
                return
            self.end = base + off + need
            yield base + off, payload
            off += need


def write_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def pack_durable(offset: int, pos: int) -> bytes:
    """The 20 bytes of a ``.durable`` file.

    >>> unpack_durable(pack_durable(12, 345))
    (12, 345)
    """
    head = struct.pack("<qq", offset, pos)
    return DURABLE.pack(offset, pos, zlib.crc32(head))


def unpack_durable(data: bytes) -> tuple[int, int] | None:
    """``(offset, position)``, or None if the bytes are not a whole, valid record."""
    if len(data) < DURABLE.size:
        return None
    offset, pos, crc = DURABLE.unpack_from(data)
    if zlib.crc32(data[:16]) != crc or offset < 0 or pos < 0:
        return None
    return offset, pos


@dataclass
class Partition:
    """Per-partition file handles and caches of known-valid frame boundaries."""

    log: Path
    idx: Path
    durable: Path
    rfd: int | None = None
    wfd: int | None = None
    ifd: int | None = None
    dfd: int | None = None
    index_offsets: list[int] = field(default_factory=list)
    index_positions: list[int] = field(default_factory=list)
    index_bytes: int = 0
    tail: tuple[int, int] = (0, 0)  # highest known (offset, byte position) boundary
    cursor: tuple[int, int] = (0, 0)  # end of the previous read (sequential reads are O(1))
    verified: tuple[int, int] = (0, 0)  # every frame before this boundary passed its CRC
    pending: list[bytes] = field(default_factory=list)
    pending_bytes: int = 0

    def read_fd(self) -> int | None:
        if self.rfd is None:
            try:
                self.rfd = os.open(self.log, os.O_RDONLY)
            except FileNotFoundError:
                return None
        return self.rfd

    def read_durable(self) -> tuple[int, int] | None:
        """The published durable end; None for a log written before durable ends existed."""
        if self.dfd is None:
            try:
                self.dfd = os.open(self.durable, os.O_RDONLY)
            except FileNotFoundError:
                return None
        data = os.pread(self.dfd, DURABLE.size, 0)
        end = unpack_durable(data)
        if end is None:
            raise LogCorruption(self.durable, 0, -1, "unreadable durable-end record")
        return end

    @property
    def start_file(self) -> Path:
        return self.durable.with_suffix(".start")

    def read_start(self) -> int:
        """The log start (first offset still served); 0 until a prefix was removed.

        Read from disk each time: another process may have removed a prefix since.
        """
        try:
            return int(json.loads(self.start_file.read_text(encoding="utf-8"))["start"])
        except FileNotFoundError:
            return 0

    def write_durable(self, offset: int, pos: int) -> None:
        """Publish a new durable end (the caller holds the write lock and synced the log)."""
        fd = os.open(self.durable, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            write_all(fd, pack_durable(offset, pos), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        for fd in (self.rfd, self.wfd, self.ifd, self.dfd):
            if fd is not None:
                os.close(fd)
        self.rfd = self.wfd = self.ifd = self.dfd = None

    def load_index(self) -> None:
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
            self.load_index()
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
        for known in (self.tail, self.cursor, self.verified):
            if best[0] < known[0] <= offset:
                best = known
        return best

    def note(self, offset: int, pos: int) -> None:
        if offset > self.tail[0]:
            self.tail = (offset, pos)

    def reset_caches(self) -> None:
        """Forget every cached boundary (after a repair rewrote the files)."""
        self.close()
        self.index_offsets, self.index_positions, self.index_bytes = [], [], 0
        self.tail = self.cursor = self.verified = (0, 0)
