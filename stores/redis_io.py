"""The plumbing of the Redis store: connection, keys, batched reads and writes.

Kept apart from :mod:`stores.redis_store` (the public API) so each stays small;
see that module for the key layout and why it has that shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from stores.base import StoreError, VersionError, VersionInfo, chunks
from stores.redis_scripts import (
    APPEND_LUA,
    DELETE_LUA,
    LEASE_LUA,
    PIN_LUA,
    READ_CURRENT_LUA,
    SET_CURRENT_LUA,
    guarded,
)

_READ_PIPELINE_CHUNKS = 8  # MGET chunks sent per round trip
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]+$")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


class RedisIO:
    """Connection, key layout and batched I/O under :class:`stores.redis_store.RedisStore`."""

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
        self._set_current_script = self._client.register_script(SET_CURRENT_LUA)
        self._delete_script = self._client.register_script(DELETE_LUA)
        self._pin_script = self._client.register_script(PIN_LUA)
        self._lease_script = self._client.register_script(LEASE_LUA)
        self._append_script = self._client.register_script(APPEND_LUA)
        self._read_current_script = self._client.register_script(READ_CURRENT_LUA)
        try:
            self._probe()
        except StoreError:
            self._client.close()
            raise

    @guarded
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
    @guarded
    def ping(self) -> None:
        self._client.ping()

    def _write(
        self, rows: Sequence[tuple[str, str, bytes | str]], id_set: str | None = None
    ) -> None:
        """Write ``(key, id, value)`` rows: pipelined MSET (+ SADD of the ids) per ``batch_size``.

        MSET precedes SADD, so an id in the set always has its key, even if the
        connection drops between the two.
        """
        for chunk in chunks(rows, self.batch_size):
            pipe = self._client.pipeline(transaction=False)
            pipe.mset({key: value for key, _, value in chunk})
            if id_set is not None:
                pipe.sadd(id_set, *(i for _, i, _ in chunk))
            pipe.execute()

    def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """MGET in chunks of ``batch_size``, a few chunks per round trip."""
        out: list[bytes | None] = []
        parts = list(chunks(keys, self.batch_size))
        for group in chunks(parts, _READ_PIPELINE_CHUNKS):
            pipe = self._client.pipeline(transaction=False)
            for chunk in group:
                pipe.mget(chunk)
            for values in pipe.execute():
                out.extend(values)
        return out

    def _members(self, set_key: str, ids: Sequence[str]) -> np.ndarray:
        """SMISMEMBER in chunks (pipelined like :meth:`_mget`) -> bool per id."""
        flags: list[int] = []
        parts = list(chunks(ids, self.batch_size))
        for group in chunks(parts, _READ_PIPELINE_CHUNKS):
            pipe = self._client.pipeline(transaction=False)
            for chunk in group:
                pipe.smismember(set_key, chunk)
            for values in pipe.execute():
                flags.extend(values)
        return np.asarray(flags, dtype=bool).reshape(len(ids))

    def _info(self, version: str) -> VersionInfo | None:
        raw = self._client.hget(self._k("versions"), version)
        return None if raw is None else VersionInfo.model_validate_json(raw)

    def _require(self, version: str) -> VersionInfo:
        info = self._info(version)
        if info is None:
            raise VersionError(f"unknown teacher version {version!r} in {self.describe()}")
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

    def _put(self, info: VersionInfo, kind: str, rows: Sequence[tuple[str, str, bytes]]) -> int:
        """Write ``(key, id, value)`` rows of one version: MSET while it is being written,
        the atomic append script once it is complete (new ids only, sequence numbers)."""
        version = info.teacher_version
        table, prefix = (("embeddings", "emb") if kind == "emb" else ("labels", "label"))
        if info.status == "writing":
            self._write(rows, self._k(version, f"{prefix}_ids"))
            return len(rows)
        added = 0
        keys = [self._k("versions"), self._k(version, f"{prefix}_ids"),
                self._k(version, f"{prefix}_seq")]
        head = f"{self.namespace}:{version}:{prefix}:"
        for chunk in chunks(list({i: (i, v) for _, i, v in rows}.values()), self.batch_size):
            args = [version, table, head, *(x for pair in chunk for x in pair)]
            added += int(self._append_script(keys=keys, args=args))
        return added

    def _visible(self, version: str, kind: str, ids: Sequence[str], max_seq: int | None
                 ) -> np.ndarray | None:
        """False where a record was appended after ``max_seq`` (None: no filter)."""
        if max_seq is None or not len(ids):
            return None
        seqs: list[bytes | None] = []
        for chunk in chunks(list(ids), self.batch_size):
            seqs += self._client.hmget(self._k(version, f"{kind}_seq"), list(chunk))
        return np.fromiter((s is None or int(s) <= max_seq for s in seqs), dtype=bool,
                           count=len(ids))
