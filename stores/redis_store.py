"""Redis store: the shared online backend for many readers (servers, students).

Key layout (``ns`` = namespace, ``v`` = teacher version)::

    ns:text:{candidate_id}        candidate code (version independent: ids are content hashes)
    ns:{v}:emb:{candidate_id}     codec-encoded embedding
    ns:{v}:label:{query_id}       codec-encoded soft-label record
    ns:{v}:emb_ids, ns:{v}:label_ids   sets of written ids (iteration, has_*, counts)
    ns:versions                   hash: version -> VersionInfo JSON
    ns:current                    the current version
    ns:pins:{v}                   set of consumers pinning v
    ns:expiring                   hash: version -> ISO deadline, for versions given a TTL

Why this shape: a version's records never change once it is complete and live
under their own version's keys, so switching versions is one ``SET`` of
``ns:current`` (done by a Lua script that first checks the manifest says
*complete*), and a reader that resolved a version and MGETs its keys sees whole
records of that version only. All bulk I/O is batched: non-transactional
pipelines of ``batch_size`` records per write, chunked MGET / SMISMEMBER per read.

Needs Redis >= 7.0 (``EXPIRE ... NX``; ``SMISMEMBER`` needs 6.2).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from stores.base import SoftLabelRecord, StoreError, StoreUnavailable, VersionError, VersionInfo
from stores.codec import (
    check_embeddings,
    check_record,
    check_version_name,
    decode_label,
    decode_vectors,
    encode_label,
    encode_vectors,
)
from stores.embedded import _check_resume, _completed

P = ParamSpec("P")
R = TypeVar("R")

_READ_PIPELINE_CHUNKS = 8  # MGET chunks sent per round trip
_READ_ATTEMPTS = 2  # read_current_labels: first try + one retry, then the atomic script
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]+$")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")

# ARGV[1] = version. KEYS: versions hash, current, emb_ids, label_ids.
# Refuses an unknown / incomplete version and one whose data has expired.
_SET_CURRENT_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return redis.error_reply('VERSION unknown teacher version ' .. ARGV[1]) end
local info = cjson.decode(raw)
if info['status'] ~= 'complete' then
  return redis.error_reply('VERSION version ' .. ARGV[1] .. ' is ' .. tostring(info['status'])
    .. '; only a complete one can become current')
end
local counts = info['counts']
if type(counts) == 'table' then
  if (tonumber(counts['embeddings']) or 0) > 0 and redis.call('EXISTS', KEYS[3]) == 0
     or (tonumber(counts['labels']) or 0) > 0 and redis.call('EXISTS', KEYS[4]) == 0 then
    return redis.error_reply('VERSION data of version ' .. ARGV[1] .. ' has expired or was deleted')
  end
end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

# ARGV[1] = version. KEYS: versions hash, current, pins set. Removes the manifest entry
# *first*, so a reader that then misses keys knows the version is gone and retries.
_DELETE_LUA = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  return redis.error_reply('VERSION version ' .. ARGV[1] .. ' is current; it cannot be deleted')
end
if redis.call('SCARD', KEYS[3]) > 0 then
  return redis.error_reply('VERSION version ' .. ARGV[1] .. ' is pinned by '
    .. table.concat(redis.call('SMEMBERS', KEYS[3]), ','))
end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# KEYS[1] = current; ARGV[1] = "ns:", ARGV[2..] = query ids. Resolves and reads in one
# atomic step: the fallback of read_current_labels when versions churn faster than it
# reads. (Label keys are built inside, so this is for standalone Redis, not Cluster.)
_READ_CURRENT_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return redis.error_reply('VERSION no current version') end
local out = {}
local keys = {}
for i = 2, #ARGV do
  keys[#keys + 1] = ARGV[1] .. v .. ':label:' .. ARGV[i]
  if #keys == 1000 or i == #ARGV then
    for _, value in ipairs(redis.call('MGET', unpack(keys))) do out[#out + 1] = value end
    keys = {}
  end
end
return {v, out}
"""

# ARGV = version, consumer. KEYS: versions hash, pins set.
_PIN_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return redis.error_reply('VERSION unknown teacher version ' .. ARGV[1])
end
return redis.call('SADD', KEYS[2], ARGV[2])
"""


def _store_error(address: str, exc: redis.RedisError) -> StoreError:
    """The store error for a redis-py error; names the server, so logs say where."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return StoreUnavailable(f"cannot reach Redis at {address}: {exc}")
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return StoreUnavailable(
            f"cannot reach Redis at {address}: invalid reply, is it a Redis server? {exc}"
        )
    msg = str(exc)
    if isinstance(exc, redis.ResponseError) and msg.startswith("VERSION "):
        return VersionError(msg.removeprefix("VERSION "))  # raised by our Lua scripts
    return StoreError(f"Redis at {address}: {msg}")


def _guarded(
    method: Callable[Concatenate[RedisStore, P], R],
) -> Callable[Concatenate[RedisStore, P], R]:
    """Translate redis-py errors raised by a method into :mod:`stores.base` errors."""

    @functools.wraps(method)
    def wrapper(self: RedisStore, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise _store_error(self.address, exc) from exc

    return wrapper


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class RedisStore:
    """:class:`stores.base.Store` on a Redis server (redis-py + hiredis)."""

    def __init__(
        self,
        url: str,
        namespace: str = "codistill",
        *,
        batch_size: int = 256,
        ttl_s: int | None = None,
        connect_timeout_s: float = 2.0,
        socket_timeout_s: float = 30.0,
    ) -> None:
        if not _NAMESPACE.match(namespace):
            raise ValueError(f"namespace must match [A-Za-z0-9_.-]+ (no ':'), got {namespace!r}")
        self.namespace = namespace
        self.batch_size = batch_size
        self.ttl_s = ttl_s
        # URL query options (e.g. ?socket_connect_timeout=5) override these defaults.
        # One immediate retry transparently replaces a pooled connection that died
        # with a restarted server; more retries would only delay a clear failure.
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        kw = self._client.connection_pool.connection_kwargs
        self.address = kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
        self._db = kw.get("db", 0)
        self._set_current_script = self._client.register_script(_SET_CURRENT_LUA)
        self._delete_script = self._client.register_script(_DELETE_LUA)
        self._pin_script = self._client.register_script(_PIN_LUA)
        self._read_current_script = self._client.register_script(_READ_CURRENT_LUA)
        try:
            self._probe()
        except StoreError:
            self._client.close()
            raise

    @_guarded
    def _probe(self) -> None:
        """PING once with short timeouts and no retry: a wrong address fails in seconds.

        The regular client waits up to ``socket_timeout_s`` for big replies; a port
        that accepts but never answers (not Redis, or a hung server) must not cost
        that long at open time.
        """
        t = self._connect_timeout_s
        probe = redis.Redis.from_url(
            self._url, socket_connect_timeout=t, socket_timeout=t, retry=Retry(NoBackoff(), 0)
        )
        try:
            probe.ping()
        finally:
            probe.close()

    # ------------------------------------------------------------------ keys
    def _k(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def _emb_key(self, version: str, cid: str) -> str:
        return f"{self.namespace}:{version}:emb:{cid}"

    def _label_key(self, version: str, qid: str) -> str:
        return f"{self.namespace}:{version}:label:{qid}"

    def _text_key(self, cid: str) -> str:
        return f"{self.namespace}:text:{cid}"

    def _version_pattern(self, version: str) -> str:
        return _GLOB_SPECIAL.sub(r"\\\1", f"{self.namespace}:{version}:") + "*"

    # ------------------------------------------------------------------ plumbing
    @_guarded
    def ping(self) -> None:
        self._client.ping()

    def _write(
        self, rows: Sequence[tuple[str, str, bytes | str]], id_set: str | None = None
    ) -> None:
        """Write ``(key, id, value)`` rows: pipelined MSET (+ SADD of the ids) per ``batch_size``.

        MSET precedes SADD, so an id in the set always has its key, even if the
        connection drops between the two.
        """
        for chunk in _chunks(rows, self.batch_size):
            pipe = self._client.pipeline(transaction=False)
            pipe.mset({key: value for key, _, value in chunk})
            if id_set is not None:
                pipe.sadd(id_set, *(i for _, i, _ in chunk))
            pipe.execute()

    def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """MGET in chunks of ``batch_size``, a few chunks per round trip."""
        out: list[bytes | None] = []
        chunks = list(_chunks(keys, self.batch_size))
        for group in _chunks(chunks, _READ_PIPELINE_CHUNKS):
            pipe = self._client.pipeline(transaction=False)
            for chunk in group:
                pipe.mget(chunk)
            for values in pipe.execute():
                out.extend(values)
        return out

    def _members(self, set_key: str, ids: Sequence[str]) -> np.ndarray:
        """SMISMEMBER in chunks (pipelined like :meth:`_mget`) -> bool per id."""
        flags: list[int] = []
        chunks = list(_chunks(ids, self.batch_size))
        for group in _chunks(chunks, _READ_PIPELINE_CHUNKS):
            pipe = self._client.pipeline(transaction=False)
            for chunk in group:
                pipe.smismember(set_key, chunk)
            for values in pipe.execute():
                flags.extend(values)
        return np.asarray(flags, dtype=bool).reshape(len(ids))

    def _info(self, version: str) -> VersionInfo | None:
        raw = self._client.hget(self._k("versions"), version)
        return None if raw is None else VersionInfo.model_validate_json(raw)

    def _require(self, version: str, *, writing: bool = False) -> VersionInfo:
        info = self._info(version)
        if info is None:
            raise VersionError(f"unknown teacher version {version!r} in {self.describe()}")
        if writing and info.status != "writing":
            raise VersionError(f"version {version!r} is {info.status}; it can no longer be written")
        return info

    def _scan_version_keys(self, version: str) -> Iterator[list[str]]:
        """Batches of all keys under ``ns:{version}:`` (SCAN MATCH, never KEYS)."""
        batch: list[str] = []
        for key in self._client.scan_iter(match=self._version_pattern(version), count=1000):
            batch.append(key.decode() if isinstance(key, bytes) else key)
            if len(batch) >= self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _apply(self, version: str, command: str) -> None:
        """Run ``expire`` / ``persist`` / ``unlink`` on every key of a version, pipelined."""
        for batch in self._scan_version_keys(version):
            pipe = self._client.pipeline(transaction=False)
            if command == "unlink":
                pipe.unlink(*batch)
            elif command == "expire":
                for key in batch:
                    pipe.expire(key, int(self.ttl_s or 0), nx=True)
            else:
                for key in batch:
                    pipe.persist(key)
            pipe.execute()

    def _persist_if_expiring(self, version: str, *, forget: bool) -> None:
        """Undo a TTL given by ``expire_stale_versions`` (cheap check, SCAN only if needed).

        ``forget`` drops the version's "expiring" mark too; only once it is protected.
        """
        if self._client.hexists(self._k("expiring"), version):
            self._apply(version, "persist")
            if forget:
                self._client.hdel(self._k("expiring"), version)

    # ------------------------------------------------------------------ candidates
    @_guarded
    def put_texts(self, texts: Mapping[str, str]) -> None:
        self._write([(self._text_key(cid), cid, text) for cid, text in texts.items()])

    @_guarded
    def get_texts(self, ids: Sequence[str]) -> list[str | None]:
        raw = self._mget([self._text_key(cid) for cid in ids])
        return [None if v is None else v.decode("utf-8") for v in raw]

    @_guarded
    def put_embeddings(self, version: str, ids: Sequence[str], embeddings: np.ndarray) -> None:
        info = self._require(version, writing=True)
        check_embeddings(version, info.dim, ids, embeddings)
        blobs = encode_vectors(embeddings, info.embedding_dtype)
        rows = [(self._emb_key(version, c), c, b) for c, b in zip(ids, blobs, strict=True)]
        self._write(rows, self._k(version, "emb_ids"))

    @_guarded
    def get_embeddings(self, version: str, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        info = self._require(version)
        return decode_vectors(self._mget([self._emb_key(version, c) for c in ids]), info.dim)

    @_guarded
    def has_embeddings(self, version: str, ids: Sequence[str]) -> np.ndarray:
        return self._members(self._k(version, "emb_ids"), ids)

    @_guarded
    def iter_candidate_ids(self, version: str) -> Iterator[str]:
        """Ids in no particular order (SSCAN); the generator translates errors too."""
        return self._iter_ids(version)

    def _iter_ids(self, version: str) -> Iterator[str]:
        try:
            for cid in self._client.sscan_iter(self._k(version, "emb_ids"), count=1000):
                yield cid.decode("utf-8")
        except redis.RedisError as exc:
            raise _store_error(self.address, exc) from exc

    # ------------------------------------------------------------------ labels
    @_guarded
    def put_labels(self, records: Sequence[SoftLabelRecord]) -> None:
        by_version: dict[str, list[SoftLabelRecord]] = {}
        for rec in records:
            by_version.setdefault(rec.teacher_version, []).append(rec)
        encoded: dict[str, list[tuple[str, str, bytes]]] = {}
        for version, recs in by_version.items():  # validate everything before writing
            info = self._require(version, writing=True)
            for rec in recs:
                check_record(rec, info.dim, info.logit_scale)
            encoded[version] = [
                (
                    self._label_key(version, r.query_id),
                    r.query_id,
                    encode_label(r, info.embedding_dtype),
                )
                for r in recs
            ]
        for version, rows in encoded.items():
            self._write(rows, self._k(version, "label_ids"))

    @_guarded
    def get_labels(self, version: str, query_ids: Sequence[str]) -> list[SoftLabelRecord | None]:
        raw = self._mget([self._label_key(version, q) for q in query_ids])
        return [None if b is None else decode_label(b) for b in raw]

    @_guarded
    def has_labels(self, version: str, query_ids: Sequence[str]) -> np.ndarray:
        return self._members(self._k(version, "label_ids"), query_ids)

    # ------------------------------------------------------------------ manifest
    @_guarded
    def begin_version(self, info: VersionInfo) -> None:
        check_version_name(info.teacher_version)
        key = self._k("versions")
        if self._client.hsetnx(key, info.teacher_version, info.model_dump_json()):
            return
        existing = self._info(info.teacher_version)
        if existing is None:  # deleted in between: start afresh
            self._client.hsetnx(key, info.teacher_version, info.model_dump_json())
            return
        _check_resume(existing, info)

    @_guarded
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
                    done = _completed(VersionInfo.model_validate_json(raw), measured, counts)
                    pipe.multi()
                    pipe.hset(key, version, done.model_dump_json())
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue  # the manifest changed meanwhile: re-read it

    @_guarded
    def get_version(self, version: str) -> VersionInfo | None:
        return self._info(version)

    @_guarded
    def versions(self) -> list[VersionInfo]:
        raw = self._client.hvals(self._k("versions"))
        infos = [VersionInfo.model_validate_json(r) for r in raw]
        return sorted(infos, key=lambda i: (i.created_at, i.teacher_version))

    @_guarded
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

    @_guarded
    def current(self) -> str | None:
        raw = self._client.get(self._k("current"))
        return None if raw is None else raw.decode("utf-8")

    @_guarded
    def pin(self, version: str, consumer: str) -> None:
        self._pin_script(
            keys=[self._k("versions"), self._k("pins", version)], args=[version, consumer]
        )
        self._persist_if_expiring(version, forget=True)

    @_guarded
    def unpin(self, version: str, consumer: str) -> None:
        self._client.srem(self._k("pins", version), consumer)

    @_guarded
    def pins(self, version: str) -> set[str]:
        return {m.decode("utf-8") for m in self._client.smembers(self._k("pins", version))}

    @_guarded
    def delete_version(self, version: str) -> None:
        """Drop the manifest entry (atomically checked), then UNLINK the version's keys.

        Idempotent: an unknown version only has leftover keys removed.
        """
        self._delete_script(
            keys=[self._k("versions"), self._k("current"), self._k("pins", version)],
            args=[version],
        )
        self._apply(version, "unlink")
        self._client.hdel(self._k("expiring"), version)

    @_guarded
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
    @_guarded
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

    def _protected(self, version: str) -> bool:
        return self.current() == version or bool(self._client.scard(self._k("pins", version)))

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
