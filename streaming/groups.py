"""Consumer groups of the embedded log: committed offsets and the one member a group has."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path
from urllib.parse import quote

from streaming.base import EventReader, Record, StreamError


def group_path(groups_dir: Path, group: str, suffix: str) -> Path:
    """The file of ``group`` (offsets ``.json``, ``.lock``, ``.member``) in ``groups_dir``."""
    if not group:
        raise ValueError("group must be a non-empty string")
    groups_dir.mkdir(exist_ok=True)
    return groups_dir / (quote(group, safe="") + suffix)


class EmbeddedGroupConsumer:
    """A group consumer over the embedded log.

    The embedded log has no group coordinator, so a group has at most one member:
    a second consumer of the same group (any process) gets :class:`StreamError`
    rather than silently reading the same records twice.
    """

    def __init__(self, stream: EventReader, member: Path, group: str, topics: list[str]) -> None:
        self._stream, self.group = stream, group
        self._member = open(member, "a+b")  # noqa: SIM115
        try:
            fcntl.flock(self._member.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._member.close()
            raise StreamError(f"embedded group {group!r} already has a consumer") from None
        self._positions: dict[tuple[str, int], int] = {}
        self._consumed: dict[tuple[str, int], int] = {}
        for topic in topics:
            for p in stream.partitions(topic):
                # a group that never committed (or committed below a removed prefix)
                # starts at the log start, as Kafka's auto.offset.reset=earliest does
                self._positions[(topic, p)] = max(stream.committed(group, topic, p) or 0,
                                                  stream.start_offset(topic, p))
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
