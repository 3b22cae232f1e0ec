"""Redis store: the shared online backend for many readers (servers, students).

Key layout (``ns`` = namespace, ``v`` = teacher version)::

    ns:text:{candidate_id}        candidate code (version independent: ids are content hashes)
    ns:{v}:emb:{candidate_id}     codec-encoded embedding
    ns:{v}:label:{query_id}       codec-encoded soft-label record
    ns:{v}:emb_ids, ns:{v}:label_ids   sets of written ids (iteration, has_*, counts)
    ns:{v}:emb_seq, ns:{v}:label_seq   hash: id -> sequence number, for records appended
                                  after the version was complete (absent: 0)
    ns:versions                   hash: version -> VersionInfo JSON
    ns:current                    the current version
    ns:pins:{v}                   set of consumers holding a durable pin on v
    ns:pinned_at:{v}              hash: consumer -> unix time the pin was taken
    ns:leases:{v}                 hash: owner -> "created,expires" (unix s) of a lease on v
    ns:expiring                   hash: version -> ISO deadline, for versions given a TTL

Why this shape: a version's records never change once written (a complete
version only gains new keys, ``SET NX`` in one Lua script) and live under their
own version's keys, so switching versions is one ``SET`` of
``ns:current`` (done by a Lua script that first checks the manifest says
*complete*), and a reader that resolved a version and MGETs its keys sees whole
records of that version only. All bulk I/O is batched: non-transactional
pipelines of ``batch_size`` records per write, chunked MGET / SMISMEMBER per read.

Needs Redis >= 7.0 (``EXPIRE ... NX``; ``SMISMEMBER`` needs 6.2).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import redis

from stores.base import (
    Hold,
    SoftLabelRecord,
    VersionError,
    VersionInfo,
    check_resume,
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
from stores.redis_io import RedisIO
from stores.redis_scripts import guarded, store_error

_READ_ATTEMPTS = 2  # read_current_labels: first try + one retry, then the atomic script

class RedisStore(RedisIO):
    """:class:`stores.base.Store` on a Redis server (redis-py + hiredis)."""

    # ------------------------------------------------------------------ candidates
    @guarded
    def put_texts(self, texts: Mapping[str, str]) -> None:
        self._write([(self._text_key(cid), cid, text) for cid, text in texts.items()])

    @guarded
    def get_texts(self, ids: Sequence[str]) -> list[str | None]:
        raw = self._mget([self._text_key(cid) for cid in ids])
        return [None if v is None else v.decode("utf-8") for v in raw]

    @guarded
    def put_embeddings(self, version: str, ids: Sequence[str], embeddings: np.ndarray) -> int:
        info = self._require(version)
        check_embeddings(version, info.dim, ids, embeddings)
        blobs = encode_vectors(embeddings, info.embedding_dtype)
        rows = [(self._emb_key(version, c), c, b) for c, b in zip(ids, blobs, strict=True)]
        return self._put(info, "emb", rows)

    @guarded
    def get_embeddings(self, version: str, ids: Sequence[str], max_seq: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        info = self._require(version)
        raw = self._mget([self._emb_key(version, c) for c in ids])
        visible = self._visible(version, "emb", ids, max_seq)
        if visible is not None:
            raw = [v if ok else None for v, ok in zip(raw, visible, strict=True)]
        return decode_vectors(raw, info.dim)

    @guarded
    def has_embeddings(self, version: str, ids: Sequence[str], max_seq: int | None = None
                       ) -> np.ndarray:
        found = self._members(self._k(version, "emb_ids"), ids)
        visible = self._visible(version, "emb", ids, max_seq)
        return found if visible is None else found & visible

    @guarded
    def iter_candidate_ids(self, version: str) -> Iterator[str]:
        """Ids in no particular order (SSCAN); the generator translates errors too."""
        return self._iter_ids(version)

    def _iter_ids(self, version: str) -> Iterator[str]:
        try:
            for cid in self._client.sscan_iter(self._k(version, "emb_ids"), count=1000):
                yield cid.decode("utf-8")
        except redis.RedisError as exc:
            raise store_error(self.address, exc) from exc

    # ------------------------------------------------------------------ labels
    @guarded
    def put_labels(self, records: Sequence[SoftLabelRecord]) -> int:
        by_version: dict[str, list[SoftLabelRecord]] = {}
        for rec in records:
            by_version.setdefault(rec.teacher_version, []).append(rec)
        encoded: dict[str, tuple[VersionInfo, list[tuple[str, str, bytes]]]] = {}
        for version, recs in by_version.items():  # validate everything before writing
            info = self._require(version)
            for rec in recs:
                check_record(rec, info.dim, info.logit_scale)
            encoded[version] = (info, [
                (
                    self._label_key(version, r.query_id),
                    r.query_id,
                    encode_label(r, info.embedding_dtype),
                )
                for r in recs
            ])
        return sum(self._put(info, "label", rows) for info, rows in encoded.values())

    @guarded
    def get_labels(self, version: str, query_ids: Sequence[str], max_seq: int | None = None
                   ) -> list[SoftLabelRecord | None]:
        raw = self._mget([self._label_key(version, q) for q in query_ids])
        visible = self._visible(version, "label", query_ids, max_seq)
        if visible is not None:
            raw = [v if ok else None for v, ok in zip(raw, visible, strict=True)]
        return [None if b is None else decode_label(b) for b in raw]

    @guarded
    def has_labels(self, version: str, query_ids: Sequence[str], max_seq: int | None = None
                   ) -> np.ndarray:
        found = self._members(self._k(version, "label_ids"), query_ids)
        visible = self._visible(version, "label", query_ids, max_seq)
        return found if visible is None else found & visible

    # ------------------------------------------------------------------ manifest
    @guarded
    def begin_version(self, info: VersionInfo) -> None:
        check_version_name(info.teacher_version)
        key = self._k("versions")
        if self._client.hsetnx(key, info.teacher_version, info.model_dump_json()):
            return
        existing = self._info(info.teacher_version)
        if existing is None:  # deleted in between: start afresh
            self._client.hsetnx(key, info.teacher_version, info.model_dump_json())
            return
        check_resume(existing, info)

    @guarded
    def complete_version(self, version: str, counts: Mapping[str, int] | None = None) -> None:
        """Mark complete with measured counts; WATCH makes it lose, not resurrect, against a
        concurrent ``delete_version``."""
        key = self._k("versions")
        measured = {
            "embeddings": int(self._client.scard(self._k(version, "emb_ids"))),
            "labels": int(self._client.scard(self._k(version, "label_ids"))),
        }
        with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, version)
                    if raw is None:
                        raise VersionError(f"unknown teacher version {version!r}")
                    done = completed_info(VersionInfo.model_validate_json(raw), measured, counts)
                    pipe.multi()
                    pipe.hset(key, version, done.model_dump_json())
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue  # the manifest changed meanwhile: re-read it

    @guarded
    def get_version(self, version: str) -> VersionInfo | None:
        return self._info(version)

    @guarded
    def versions(self) -> list[VersionInfo]:
        raw = self._client.hvals(self._k("versions"))
        infos = [VersionInfo.model_validate_json(r) for r in raw]
        return sorted(infos, key=lambda i: (i.created_at, i.teacher_version))

    @guarded
    def set_current(self, version: str) -> None:
        """Check *complete* and switch in one script; then undo any TTL the version had.

        The TTL is removed before and after the switch: before, so the data cannot
        expire under the new pointer; after, to win a race with a concurrent
        ``expire_stale_versions`` (which re-checks *current* after expiring).
        """
        self._persist_if_expiring(version, forget=False)
        keys = [
            self._k("versions"),
            self._k("current"),
            self._k(version, "emb_ids"),
            self._k(version, "label_ids"),
        ]
        self._set_current_script(keys=keys, args=[version])
        self._persist_if_expiring(version, forget=True)

    @guarded
    def current(self) -> str | None:
        raw = self._client.get(self._k("current"))
        return None if raw is None else raw.decode("utf-8")

    @guarded
    def pin(self, version: str, consumer: str) -> None:
        self._pin_script(
            keys=[self._k("versions"), self._k("pins", version), self._k("pinned_at", version)],
            args=[version, consumer, repr(time.time())],
        )
        self._persist_if_expiring(version, forget=True)

    @guarded
    def unpin(self, version: str, consumer: str) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.srem(self._k("pins", version), consumer)
        pipe.hdel(self._k("pinned_at", version), consumer)
        pipe.execute()

    @guarded
    def pins(self, version: str) -> set[str]:
        return {m.decode("utf-8") for m in self._client.smembers(self._k("pins", version))}

    @guarded
    def lease(self, version: str, owner: str, ttl_s: float) -> Hold:
        now = time.time()
        created = self._lease_script(keys=[self._k("versions"), self._k("leases", version)],
                                     args=[version, owner, repr(now), repr(now + ttl_s)])
        self._persist_if_expiring(version, forget=True)
        return Hold(version=version, kind="lease", owner=owner, created_at=float(created),
                    expires_at=now + ttl_s)

    @guarded
    def release(self, version: str, owner: str) -> None:
        self._client.hdel(self._k("leases", version), owner)

    @guarded
    def holds(self, version: str) -> list[Hold]:
        now = time.time()
        out, expired = [], []
        for owner, raw in self._client.hgetall(self._k("leases", version)).items():
            created, expires = (float(x) for x in raw.decode().split(","))
            if expires > now:
                out.append(Hold(version=version, kind="lease", owner=owner.decode("utf-8"),
                                created_at=created, expires_at=expires))
            else:
                expired.append(owner)
        if expired:
            self._client.hdel(self._k("leases", version), *expired)
        ages = self._client.hgetall(self._k("pinned_at", version))
        pins = [Hold(version=version, kind="pin", owner=c, created_at=float(ages.get(c.encode(), 0)))
                for c in sorted(self.pins(version))]
        return pins + out

    @guarded
    def delete_version(self, version: str) -> None:
        """Drop the manifest entry (atomically checked), then UNLINK the version's keys.

        Idempotent: an unknown version only has leftover keys removed.
        """
        self._delete_script(
            keys=[self._k("versions"), self._k("current"), self._k("pins", version),
                  self._k("leases", version), self._k("pinned_at", version)],
            args=[version, repr(time.time())],
        )
        self._apply(version, "unlink")
        self._client.hdel(self._k("expiring"), version)

    @guarded
    def read_current_labels(
        self, query_ids: Sequence[str]
    ) -> tuple[str, list[SoftLabelRecord | None]]:
        """Resolve *current*, MGET that version's labels; retry if it was deleted meanwhile.

        Keys of a resolved version only disappear if the version is deleted, and
        deletion removes the manifest entry first: missing keys + missing entry
        means "read again from the new current"; missing keys + entry present
        means those queries really have no label. If the retry is overtaken too
        (versions switched *and* deleted faster than one read), a Lua script
        resolves and reads atomically, so a read never fails for churn.
        """
        for _ in range(_READ_ATTEMPTS):
            version = self.current()
            if version is None:
                raise VersionError(f"no current version in {self.describe()}")
            raw = self._mget([self._label_key(version, q) for q in query_ids])
            if all(b is not None for b in raw) or self._client.hexists(
                self._k("versions"), version
            ):
                return version, [None if b is None else decode_label(b) for b in raw]
        args = [f"{self.namespace}:", *query_ids]
        raw_version, raw = self._read_current_script(keys=[self._k("current")], args=args)
        return raw_version.decode("utf-8"), [None if b is None else decode_label(b) for b in raw]

    # ------------------------------------------------------------------ TTL
    @guarded
    def expire_stale_versions(self) -> list[str]:
        """Give every key of complete, unpinned, non-current versions a TTL of ``ttl_s``.

        ``EXPIRE ... NX`` keeps the first deadline, so calling this periodically does
        not postpone expiry. Versions still being written are left alone. A version
        that became current or pinned meanwhile gets its TTL removed again. Manifest
        entries of versions whose data has expired are removed. Returns the versions
        that now carry a TTL.
        """
        if not self.ttl_s:
            return []
        expiring_key = self._k("expiring")
        stale = []
        for info in self.versions():
            version = info.teacher_version
            if info.status != "complete" or self._protected(version):
                continue
            deadline = datetime.now(UTC) + timedelta(seconds=self.ttl_s)
            self._client.hsetnx(expiring_key, version, deadline.isoformat())
            self._apply(version, "expire")
            if self._protected(version):  # lost a race with set_current / pin
                self._apply(version, "persist")
                self._client.hdel(expiring_key, version)
            else:
                stale.append(version)
        self._reap_expired()
        return stale

    @guarded
    def expiring(self) -> dict[str, float]:
        return {v.decode(): datetime.fromisoformat(d.decode()).timestamp()
                for v, d in self._client.hgetall(self._k("expiring")).items()}

    def _protected(self, version: str) -> bool:
        return (self.current() == version or bool(self._client.scard(self._k("pins", version)))
                or any(h.kind == "lease" for h in self.holds(version)))

    def _reap_expired(self) -> None:
        """Forget versions whose deadline passed and whose data Redis has dropped."""
        now = datetime.now(UTC)
        for raw_version, raw_deadline in self._client.hgetall(self._k("expiring")).items():
            version = raw_version.decode("utf-8")
            if datetime.fromisoformat(raw_deadline.decode()) > now:
                continue
            if self._client.exists(self._k(version, "emb_ids"), self._k(version, "label_ids")):
                continue
            if self._protected(version):
                continue
            self._client.hdel(self._k("versions"), version)
            self._client.hdel(self._k("expiring"), version)

    # ------------------------------------------------------------------ lifecycle
    def describe(self) -> str:
        scheme = "unix" if "/" in self.address else "redis"
        return f"{scheme}://{self.address}/{self._db} ns={self.namespace}"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
