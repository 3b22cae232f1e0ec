"""The Redis store against a real redis-server: consistency, TTL and outages.

No mocks: version switches race real reader threads, TTLs are read back from
the server, and the outage test kills and restarts a private redis-server.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from codistill.config import StoreSettings
from stores import (
    RedisStore,
    SoftLabelRecord,
    StoreUnavailable,
    VersionError,
    VersionInfo,
    open_store,
)
from tests.helpers.redis_process import RedisProcess, free_port

pytestmark = pytest.mark.integration

DIM = 16
N_CANDIDATES = 8


def _info(version: str, dim: int = DIM) -> VersionInfo:
    return VersionInfo(teacher_version=version, model="m", logit_scale=20.0, dim=dim)


def _record(version: str, qid: str, k: int) -> SoftLabelRecord:
    """A record whose every number says which version ``k`` wrote it."""
    return SoftLabelRecord(
        query_id=qid,
        teacher_version=version,
        candidate_ids=[f"c{k}-{j}" for j in range(N_CANDIDATES)],
        scores=np.full(N_CANDIDATES, k, np.float32),
        query_embedding=np.full(DIM, k, np.float32),
        logit_scale=20.0,
    )


def _write_version(store: RedisStore, k: int, qids: list[str]) -> str:
    version = f"v{k}"
    store.begin_version(_info(version))
    store.put_labels([_record(version, q, k) for q in qids])
    store.put_embeddings(version, [f"e{k}-{i}" for i in range(10)], np.full((10, DIM), k))
    store.complete_version(version)
    return version


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    ns = f"itest-{uuid.uuid4().hex[:12]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
    if keys:
        client.unlink(*keys)
    client.close()


# ---------------------------------------------------------------- (a) consistency
def test_version_switch_under_concurrent_readers(redis_url: str, namespace: str) -> None:
    """Readers never see a mix of versions, a partial read or a wrong version label."""
    qids = [f"q{i}" for i in range(100)]
    writer = RedisStore(redis_url, namespace, batch_size=64)
    # a small MGET chunk: one read spans several round trips, so switches land mid-read
    readers = RedisStore(redis_url, namespace, batch_size=10)
    writer.set_current(_write_version(writer, 1, qids))
    stop = threading.Event()
    failures: list[str] = []
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def check(version: str, records: list[SoftLabelRecord | None]) -> str | None:
        k = int(version[1:])
        if any(r is None for r in records):
            return f"{version}: partial read ({sum(r is None for r in records)} missing)"
        for r in records:
            assert r is not None
            if r.teacher_version != version or not (r.scores == k).all():
                return f"reported {version}, got a record of {r.teacher_version} / {r.scores[0]}"
            if not (r.query_embedding == k).all() or r.candidate_ids[0] != f"c{k}-0":
                return f"{version}: record {r.query_id} mixes versions"
        return None

    def read_loop() -> None:
        while not stop.is_set():
            try:
                version, records = readers.read_current_labels(qids)
                problem = check(version, records)
            except Exception as exc:  # noqa: BLE001 - any failure is a test failure
                version, problem = "?", f"{type(exc).__name__}: {exc}"
            with lock:
                seen[version] += 1
                if problem:
                    failures.append(problem)

    threads = [threading.Thread(target=read_loop) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        n_versions = 25
        for k in range(2, n_versions + 1):
            writer.set_current(_write_version(writer, k, qids))
            # aggressive: drop the previous version at once, so readers that resolved it
            # just before the switch find its keys gone and must retry on the new one
            writer.delete_version(f"v{k - 1}")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert sum(seen.values()) >= 100, seen
    assert len(seen) >= 5, f"readers saw too few versions: {seen}"
    assert writer.current() == f"v{n_versions}"
    assert [v.teacher_version for v in writer.versions()] == [f"v{n_versions}"]
    writer.close()
    readers.close()


def test_read_current_falls_back_to_atomic_read(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader overtaken on every optimistic attempt still gets one whole version."""
    qids = [f"q{i}" for i in range(30)]
    store = RedisStore(redis_url, namespace, batch_size=8)
    store.set_current(_write_version(store, 1, qids))
    store.set_current(_write_version(store, 2, qids))
    store.delete_version("v1")
    monkeypatch.setattr(store, "current", lambda: "v1")  # always resolves a deleted version
    version, records = store.read_current_labels([*qids, "missing"])
    assert version == "v2" and records[-1] is None
    assert all(r is not None and r.teacher_version == "v2" for r in records[:-1])
    assert all((r.scores == 2).all() for r in records[:-1] if r is not None)
    store.close()


# ---------------------------------------------------------------- (b) TTL
def _ttls(client: redis.Redis, namespace: str, version: str) -> list[int]:
    keys = list(client.scan_iter(match=f"{namespace}:{version}:*", count=1000))
    assert keys, f"no keys for {version}"
    return [client.ttl(k) for k in keys]


def test_ttl_spares_pinned_and_current(redis_url: str, namespace: str) -> None:
    store = RedisStore(redis_url, namespace, ttl_s=300, batch_size=16)
    client = redis.Redis.from_url(redis_url)
    qids = [f"q{i}" for i in range(20)]
    for k in (1, 2, 3):
        _write_version(store, k, qids)
    store.begin_version(_info("v4"))  # still being written: left alone
    store.put_labels([_record("v4", "q0", 4)])
    store.put_texts({"t1": "def f(): pass"})
    store.set_current("v3")
    store.pin("v2", "student")

    assert store.expire_stale_versions() == ["v1"]
    assert all(0 < t <= 300 for t in _ttls(client, namespace, "v1"))
    assert set(store.expiring()) == {"v1"}  # what `store info` shows as "expires in ..."
    assert time.time() < store.expiring()["v1"] <= time.time() + 300
    for version in ("v2", "v3", "v4"):
        assert set(_ttls(client, namespace, version)) == {-1}, version
    assert client.ttl(f"{namespace}:text:t1") == -1
    assert client.ttl(f"{namespace}:versions") == -1

    before = client.pttl(f"{namespace}:v1:label:q0")
    time.sleep(0.05)
    store.expire_stale_versions()  # EXPIRE NX: a second call does not push expiry back
    assert client.pttl(f"{namespace}:v1:label:q0") < before

    store.pin("v1", "server")  # pinning makes a version permanent again
    assert set(_ttls(client, namespace, "v1")) == {-1}
    store.unpin("v1", "server")
    store.unpin("v2", "student")
    assert sorted(store.expire_stale_versions()) == ["v1", "v2"]
    store.set_current("v1")  # a version that becomes current loses its TTL ...
    assert set(_ttls(client, namespace, "v1")) == {-1}
    assert sorted(store.expire_stale_versions()) == ["v2", "v3"]  # ... the old current gets one
    with pytest.raises(VersionError):
        store.delete_version("v1")
    client.close()
    store.close()


def test_expired_version_is_forgotten(redis_url: str, namespace: str) -> None:
    store = RedisStore(redis_url, namespace, ttl_s=1)
    _write_version(store, 1, ["q0", "q1"])
    store.set_current(_write_version(store, 2, ["q0", "q1"]))
    assert store.expire_stale_versions() == ["v1"]
    time.sleep(1.3)
    assert store.get_labels("v1", ["q0"]) == [None]
    with pytest.raises(VersionError, match="expired"):
        store.set_current("v1")  # the manifest still lists it, but its data is gone
    store.expire_stale_versions()  # reaps the manifest entry
    assert store.get_version("v1") is None
    assert store.read_current_labels(["q0"])[0] == "v2"
    store.close()


# ---------------------------------------------------------------- (c) wrong address
@pytest.fixture(params=["refused", "silent", "not-redis"])
def bad_address(request: pytest.FixtureRequest) -> Iterator[str]:
    """``host:port`` where no Redis answers: nothing listens / accepts but never
    replies / replies in another protocol."""
    if request.param == "refused":
        yield f"127.0.0.1:{free_port()}"
        return
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def http_answers() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    server = threading.Thread(target=http_answers)
    if request.param == "not-redis":
        server.start()
    yield f"127.0.0.1:{port}"  # "silent": the kernel accepts, nobody ever replies
    stop.set()
    if server.is_alive():
        server.join(5)
    listener.close()


def test_wrong_address_fails_fast(bad_address: str) -> None:
    settings = StoreSettings(backend="redis", redis_url=f"redis://{bad_address}/0")
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"cannot reach Redis at {bad_address}"):
        open_store(settings)
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------- (d) outage
def test_server_outage_and_recovery(tmp_path: Path) -> None:
    server = RedisProcess(free_port(), tmp_path)
    server.start()
    try:
        store = RedisStore(f"redis://127.0.0.1:{server.port}/0", "outage")
        store.put_texts({"a": "x"})
        assert store.get_texts(["a"]) == ["x"]

        server.kill()
        address = f"cannot reach Redis at 127.0.0.1:{server.port}"
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=address):
            store.get_texts(["a"])
        with pytest.raises(StoreUnavailable, match=address):
            store.put_texts({"b": "y"})
        with pytest.raises(StoreUnavailable, match=address):
            store.begin_version(_info("v1"))
        with pytest.raises(StoreUnavailable, match=address):
            list(store.iter_candidate_ids("v1"))
        assert time.monotonic() - start < 10

        server.start()  # same port, empty data (no persistence)
        assert store.get_texts(["a"]) == [None]  # the same object reconnects by itself
        store.set_current(_write_version(store, 1, ["q0"]))
        assert store.read_current_labels(["q0"])[0] == "v1"
        store.close()
    finally:
        server.kill()
