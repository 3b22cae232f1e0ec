"""One behavioural suite for every store backend, plus the codec and embedded durability.

The ``store`` fixture runs each shared test against the embedded SQLite store
and against a real Redis (``integration`` mark; a fresh namespace per test).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from codistill.config import StoreSettings
from stores import (
    CodecError,
    EmbeddedStore,
    SoftLabelRecord,
    Store,
    VersionError,
    VersionInfo,
    open_store,
)
from stores.codec import (
    decode_label,
    decode_vector,
    decode_vectors,
    encode_label,
    encode_vector,
    encode_vectors,
)

ROOT = Path(__file__).resolve().parents[1]
DIM = 8


# ---------------------------------------------------------------------------- helpers
def make_info(
    version: str = "v1", dim: int = DIM, dtype: str = "float16", **kw: object
) -> VersionInfo:
    return VersionInfo(
        teacher_version=version,
        model="teacher-m",
        logit_scale=20.0,
        dim=dim,
        embedding_dtype=dtype,
        **kw,  # type: ignore[arg-type]
    )


def make_record(
    version: str, qid: str, n: int = 5, dim: int = DIM, seed: int = 0, scale: float = 20.0
) -> SoftLabelRecord:
    rng = np.random.default_rng(seed)
    return SoftLabelRecord(
        query_id=qid,
        teacher_version=version,
        candidate_ids=[f"c{seed}-{i}-é" for i in range(n)],
        scores=rng.uniform(-1, 1, n).astype(np.float32),
        query_embedding=rng.normal(size=dim).astype(np.float32),
        logit_scale=scale,
    )


def assert_same_record(got: SoftLabelRecord | None, want: SoftLabelRecord) -> None:
    assert got is not None
    assert got.query_id == want.query_id
    assert got.teacher_version == want.teacher_version
    assert got.candidate_ids == want.candidate_ids
    assert got.scores.dtype == np.float32
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_allclose(got.query_embedding, want.query_embedding, rtol=1e-3, atol=1e-3)
    assert got.logit_scale == want.logit_scale


def complete(store: Store, version: str = "v1", n_labels: int = 3) -> list[SoftLabelRecord]:
    """Begin, fill, complete a version; returns the records written."""
    store.begin_version(make_info(version))
    records = [make_record(version, f"q{i}", seed=i) for i in range(n_labels)]
    store.put_labels(records)
    store.put_embeddings(version, ["a", "b"], np.ones((2, DIM), np.float32))
    store.complete_version(version)
    return records


def _drop_namespace(store: Store) -> None:
    client = store._client  # type: ignore[attr-defined]
    keys = list(client.scan_iter(match=f"{store.namespace}:*", count=1000))  # type: ignore[attr-defined]
    for start in range(0, len(keys), 500):
        client.unlink(*keys[start : start + 500])


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "embedded":
        settings = StoreSettings(path=tmp_path / "store")
    else:
        settings = StoreSettings(
            backend="redis",
            redis_url=request.getfixturevalue("redis_url"),
            namespace=f"test-{uuid.uuid4().hex[:12]}",
            batch_size=7,  # small, so every test crosses chunk boundaries
        )
    s = open_store(settings)
    yield s
    if request.param == "redis":
        _drop_namespace(s)
    s.close()


# ---------------------------------------------------------------------------- codec
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_codec_label_round_trip(dtype: str) -> None:
    rec = make_record("v1", "q:ü/1", n=32, dim=384, seed=3)
    blob = encode_label(rec, dtype)  # type: ignore[arg-type]
    assert len(blob) < 32 * 30 + 384 * 4 + 200  # compact: no JSON, no pickle
    got = decode_label(blob)
    assert_same_record(got, rec)
    if dtype == "float32":
        np.testing.assert_array_equal(got.query_embedding, rec.query_embedding)
    np.testing.assert_allclose(got.soft_labels(2.0), rec.soft_labels(2.0), rtol=1e-6)


def test_codec_label_edge_cases() -> None:
    empty = make_record("v1", "", n=0, dim=1)
    assert decode_label(encode_label(empty)).candidate_ids == []
    assert decode_label(
        encode_label(make_record("v1", "", n=1).model_copy(update={"candidate_ids": [""]}))
    ).candidate_ids == [""]
    with pytest.raises(ValueError, match="NUL"):
        encode_label(
            make_record("v1", "q", n=2).model_copy(update={"candidate_ids": ["a\x00", "b"]})
        )
    with pytest.raises(ValueError, match="3 candidate ids but 2 scores"):
        rec = make_record("v1", "q", n=3)
        encode_label(rec.model_copy(update={"scores": rec.scores[:2]}))


def test_codec_vector_round_trip() -> None:
    m = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    blobs = encode_vectors(m, "float32")
    assert all(len(b) == 8 + 16 * 4 + 4 for b in blobs)
    got, found = decode_vectors([blobs[0], None, blobs[2]], 16)
    assert got.dtype == np.float32 and found.tolist() == [True, False, True]
    np.testing.assert_array_equal(got[[0, 2]], m[[0, 2]])
    assert not got[1].any()
    half = decode_vector(encode_vector(m[1], "float16"))
    np.testing.assert_allclose(half, m[1], rtol=1e-3, atol=1e-3)
    with pytest.raises(CodecError, match="stored dim 16, expected 8"):
        decode_vector(blobs[0], 8)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],  # truncated
        lambda b: b[:10],
        lambda b: b"",
        lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:],  # flipped bit
        lambda b: b"XX" + b[2:],  # foreign magic
    ],
)
def test_codec_rejects_corruption(damage) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CodecError):
        decode_label(damage(encode_label(make_record("v1", "q"))))
    with pytest.raises(CodecError):
        decode_vector(damage(encode_vector(np.ones(16))))


def test_codec_rejects_newer_format() -> None:
    import struct
    import zlib

    blob = encode_vector(np.ones(4))
    body = blob[:2] + bytes([9]) + blob[3:-4]
    with pytest.raises(CodecError, match="unsupported format version 9"):
        decode_vector(body + struct.pack("<I", zlib.crc32(body)))


# ---------------------------------------------------------------------------- shared suite
def test_implements_protocol(store: Store) -> None:
    assert isinstance(store, Store)
    assert store.describe()


def test_texts_round_trip(store: Store) -> None:
    texts = {f"c{i}": f"def f{i}():\n    return 'ü{i}'\n" for i in range(30)}
    store.put_texts(texts)
    store.put_texts({"c0": "def changed(): pass"})
    ids = ["c3", "missing", "c0", "c29", "c3"]
    assert store.get_texts(ids) == [
        texts["c3"],
        None,
        "def changed(): pass",
        texts["c29"],
        texts["c3"],
    ]
    assert store.get_texts([]) == []


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_embeddings_round_trip(store: Store, dtype: str) -> None:
    store.begin_version(make_info("v1", dtype=dtype))
    rng = np.random.default_rng(1)
    ids = [f"c{i}" for i in range(1203)]  # more than one SQL / MGET chunk
    emb = rng.normal(size=(len(ids), DIM)).astype(np.float32)
    store.put_embeddings("v1", ids[:600], emb[:600])
    store.put_embeddings("v1", ids[600:], emb[600:])
    query = ["c5", "nope", "c1202", "c5"]
    got, found = store.get_embeddings("v1", query)
    assert got.dtype == np.float32 and got.shape == (4, DIM)
    assert found.dtype == np.bool_ and found.tolist() == [True, False, True, True]
    want = emb[[5, 1202, 5]]
    if dtype == "float32":
        np.testing.assert_array_equal(got[found], want)
    else:
        np.testing.assert_array_equal(got[found], want.astype(np.float16).astype(np.float32))
    assert not got[1].any()
    has = store.has_embeddings("v1", [*ids, "nope"])
    assert has.dtype == np.bool_ and has[:-1].all() and not has[-1]
    assert sorted(store.iter_candidate_ids("v1")) == sorted(ids)
    assert store.has_embeddings("other", ["c5"]).tolist() == [False]


def test_empty_inputs(store: Store) -> None:
    store.begin_version(make_info("v1"))
    store.put_texts({})
    store.put_labels([])
    store.put_embeddings("v1", [], np.zeros((0, DIM), np.float32))
    assert store.get_texts([]) == [] and store.get_labels("v1", []) == []
    emb, found = store.get_embeddings("v1", [])
    assert emb.shape == (0, DIM) and found.shape == (0,)
    assert store.has_embeddings("v1", []).shape == (0,) and store.has_labels("v1", []).shape == (0,)
    store.complete_version("v1")
    assert store.get_version("v1").counts == {"embeddings": 0, "labels": 0}  # type: ignore[union-attr]
    store.set_current("v1")
    assert store.read_current_labels([]) == ("v1", [])


def test_embedding_writes_are_checked(store: Store) -> None:
    with pytest.raises(VersionError, match="unknown"):
        store.put_embeddings("v1", ["a"], np.ones((1, DIM)))
    store.begin_version(make_info("v1"))
    with pytest.raises(ValueError, match="shape"):
        store.put_embeddings("v1", ["a", "b"], np.ones((2, DIM + 1)))
    with pytest.raises(ValueError, match="shape"):
        store.put_embeddings("v1", ["a"], np.ones((2, DIM)))
    with pytest.raises(VersionError, match="unknown"):
        store.get_embeddings("v2", ["a"])
    store.complete_version("v1")  # complete versions take new ids (appends), checked alike
    with pytest.raises(ValueError, match="shape"):
        store.put_embeddings("v1", ["a"], np.ones((1, DIM + 1)))
    assert store.put_embeddings("v1", ["a"], np.ones((1, DIM))) == 1


def test_labels_round_trip(store: Store) -> None:
    store.begin_version(make_info("v1"))
    store.begin_version(make_info("v2"))
    records = [make_record("v1", f"q:{i}/ü", seed=i) for i in range(40)]
    other = make_record("v2", "q:0/ü", seed=99)
    store.put_labels([*records, other])
    query = [r.query_id for r in records[::-1]] + ["missing"]
    got = store.get_labels("v1", query)
    for g, want in zip(got[:-1], records[::-1], strict=True):
        assert_same_record(g, want)
        np.testing.assert_allclose(g.soft_labels(), want.soft_labels(), rtol=1e-6)
    assert got[-1] is None
    assert_same_record(store.get_labels("v2", ["q:0/ü"])[0], other)
    assert store.has_labels("v1", ["q:3/ü", "missing"]).tolist() == [True, False]
    assert store.get_labels("nope", ["q:0/ü"]) == [None]
    store.put_labels([records[0].model_copy(update={"candidate_ids": list("abcde")})])
    assert store.get_labels("v1", ["q:0/ü"])[0].candidate_ids == list("abcde")  # type: ignore[union-attr]


def test_label_writes_are_checked(store: Store) -> None:
    with pytest.raises(VersionError):
        store.put_labels([make_record("v1", "q")])
    store.begin_version(make_info("v1"))
    with pytest.raises(ValueError, match="dim"):
        store.put_labels([make_record("v1", "q", dim=DIM + 1)])
    with pytest.raises(ValueError, match="logit_scale"):
        store.put_labels([make_record("v1", "q", scale=10.0)])
    assert not store.has_labels("v1", ["q"]).any()


def test_version_lifecycle(store: Store) -> None:
    assert store.current() is None and store.versions() == []
    info = make_info("v1")
    store.begin_version(info)
    stored = store.get_version("v1")
    assert stored is not None and stored.status == "writing"
    store.begin_version(make_info("v1"))  # resume: keeps the original entry
    assert store.get_version("v1").created_at == info.created_at  # type: ignore[union-attr]
    with pytest.raises(VersionError, match="dim"):
        store.begin_version(make_info("v1", dim=DIM * 2))
    with pytest.raises(VersionError, match="writing"):
        store.set_current("v1")
    with pytest.raises(VersionError):
        store.set_current("unknown")
    with pytest.raises(VersionError):
        store.complete_version("unknown")
    store.put_labels([make_record("v1", f"q{i}") for i in range(3)])
    store.put_embeddings("v1", ["a", "b"], np.ones((2, DIM)))
    store.complete_version("v1", {"queries": 3})
    done = store.get_version("v1")
    assert done is not None and done.status == "complete" and done.completed_at
    assert done.counts == {"embeddings": 2, "labels": 3, "queries": 3}
    store.set_current("v1")
    assert store.current() == "v1"
    complete(store, "v2")
    assert store.current() == "v1"  # completing does not switch
    store.set_current("v2")
    assert store.current() == "v2"
    assert [v.teacher_version for v in store.versions()] == ["v1", "v2"]


def test_complete_version_appends_new_records_only(store: Store) -> None:
    """A complete version takes *new* keys (the nearline teacher, new candidates), each with
    a sequence number, and never overwrites a record a reader may already have used."""
    records = complete(store, "v1")  # q0..q2; candidates a, b (all ones)
    assert store.get_version("v1").sequence == 0  # type: ignore[union-attr]
    assert store.put_embeddings("v1", ["b", "c"], np.full((2, DIM), 2.0, np.float32)) == 1
    changed = records[0].model_copy(update={"scores": records[0].scores * 0})
    assert store.put_labels([changed, make_record("v1", "q9", seed=9)]) == 1
    info = store.get_version("v1")
    assert info is not None and info.status == "complete" and info.sequence == 2
    assert info.counts["embeddings"] == 3 and info.counts["labels"] == 4
    emb, found = store.get_embeddings("v1", ["b", "c"])
    assert found.all() and np.allclose(emb[0], 1.0) and np.allclose(emb[1], 2.0)  # b kept
    assert_same_record(store.get_labels("v1", ["q0"])[0], records[0])  # not overwritten
    # a reader pinned to a sequence watermark sees the version as it was then
    assert store.get_labels("v1", ["q9", "q0"], max_seq=0)[0] is None
    assert store.get_labels("v1", ["q9", "q0"], max_seq=0)[1] is not None
    assert store.get_labels("v1", ["q9"], max_seq=2)[0] is not None
    assert store.has_labels("v1", ["q9", "q1"], max_seq=1).tolist() == [False, True]
    assert store.has_embeddings("v1", ["c", "a"], max_seq=0).tolist() == [False, True]
    assert store.get_embeddings("v1", ["c", "a"], max_seq=0)[1].tolist() == [False, True]
    assert store.has_embeddings("v1", ["c"], max_seq=1).tolist() == [True]
    store.set_current("v1")  # still a complete version
    assert store.put_labels([make_record("v1", "q9", seed=9)]) == 0  # again: nothing new
    assert store.get_version("v1").sequence == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["", "a:b", "v*", "text", "pins", "a b", "-x"])
def test_invalid_version_names(store: Store, name: str) -> None:
    with pytest.raises(ValueError, match="invalid teacher version"):
        store.begin_version(make_info("v1").model_copy(update={"teacher_version": name}))


def test_pins_block_delete(store: Store) -> None:
    complete(store, "v1")
    complete(store, "v2")
    store.set_current("v2")
    with pytest.raises(VersionError):
        store.pin("unknown", "student-a")
    store.pin("v1", "student-a")
    store.pin("v1", "server")
    store.pin("v1", "server")
    assert store.pins("v1") == {"student-a", "server"}
    with pytest.raises(VersionError, match="pinned"):
        store.delete_version("v1")
    with pytest.raises(VersionError, match="current"):
        store.delete_version("v2")
    store.unpin("v1", "student-a")
    with pytest.raises(VersionError, match="pinned"):
        store.delete_version("v1")
    store.unpin("v1", "server")
    assert store.pins("v1") == set()
    store.delete_version("v1")
    assert store.get_version("v1") is None
    assert store.get_labels("v1", ["q0"]) == [None]
    assert not store.has_embeddings("v1", ["a"]).any()
    assert list(store.iter_candidate_ids("v1")) == []
    assert store.get_labels("v2", ["q0"])[0] is not None  # untouched
    store.delete_version("v1")  # idempotent


def test_leases_run_out_and_durable_pins_stay(store: Store) -> None:
    """A running process holds a *lease* it renews; a SIGKILLed one leaves nothing
    permanent. A saved artifact holds a *durable pin* until it is deleted."""
    for v in ("v1", "v2", "v3"):
        complete(store, v)
    store.set_current("v3")
    with pytest.raises(VersionError, match="unknown"):
        store.lease("nope", "trainer:a", ttl_s=5)
    first = store.lease("v1", "trainer:a", ttl_s=0.4)
    assert first.owner == "trainer:a" and first.expires_at > first.created_at
    with pytest.raises(VersionError, match="leased by trainer:a"):
        store.delete_version("v1")
    renewed = store.lease("v1", "trainer:a", ttl_s=60)  # renewal keeps the lease's age
    assert renewed.created_at == first.created_at and renewed.expires_at > first.expires_at
    store.release("v1", "trainer:a")
    assert store.holds("v1") == []
    store.lease("v1", "distill:4242", ttl_s=0.2)  # its holder is SIGKILLed: never renewed
    time.sleep(0.35)
    assert store.holds("v1") == []  # expired, collected
    store.delete_version("v1")
    assert store.get_version("v1") is None

    store.pin("v2", "student:s1")
    store.lease("v2", "server:a", ttl_s=60)
    holds = {(h.kind, h.owner): h for h in store.holds("v2")}
    assert set(holds) == {("pin", "student:s1"), ("lease", "server:a")}
    assert holds[("pin", "student:s1")].expires_at is None
    assert all(0 <= time.time() - h.created_at < 30 for h in holds.values())
    store.release("v2", "server:a")
    with pytest.raises(VersionError, match="pinned"):
        store.delete_version("v2")  # a durable pin does not run out
    store.unpin("v2", "student:s1")
    store.delete_version("v2")
    with pytest.raises(VersionError, match="current"):
        store.delete_version("v3")  # the current version is never collected


def test_read_current_labels(store: Store) -> None:
    with pytest.raises(VersionError, match="no current"):
        store.read_current_labels(["q0"])
    r1 = complete(store, "v1")
    store.set_current("v1")
    version, got = store.read_current_labels(["q1", "missing", "q0"])
    assert version == "v1" and got[1] is None
    assert_same_record(got[0], r1[1])
    assert_same_record(got[2], r1[0])
    store.begin_version(make_info("v2"))
    r2 = [make_record("v2", "q0", seed=42)]
    store.put_labels(r2)
    assert store.read_current_labels(["q0"])[0] == "v1"  # writing v2 changes nothing
    store.complete_version("v2")
    store.set_current("v2")
    version, got = store.read_current_labels(["q0"])
    assert version == "v2"
    assert_same_record(got[0], r2[0])


# ---------------------------------------------------------------------------- embedded only
def _fork_child_write(store: EmbeddedStore) -> None:
    """Runs in a forked child: uses the *inherited* store object."""
    store.put_labels([make_record("v1", f"child{i}", seed=i) for i in range(50)])
    store.put_texts({"child": "written by the child"})
    store.close()


def _spawn_child_write(path: str) -> None:
    with EmbeddedStore(path) as store:
        store.put_embeddings("v1", ["x", "y"], np.full((2, DIM), 3.0))
        store.complete_version("v1")
        store.set_current("v1")


def test_embedded_shared_across_processes(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path)
    store.begin_version(make_info("v1"))
    store.put_texts({"parent": "p"})
    assert store.get_texts(["parent"]) == ["p"]  # the parent has a live connection now
    fork = multiprocessing.get_context("fork").Process(target=_fork_child_write, args=(store,))
    fork.start()
    fork.join(30)
    assert fork.exitcode == 0
    spawn = multiprocessing.get_context("spawn").Process(
        target=_spawn_child_write, args=(str(tmp_path),)
    )
    spawn.start()
    spawn.join(60)
    assert spawn.exitcode == 0
    # the parent's own (pre-fork) connection still works and sees the children's commits
    assert store.get_texts(["child", "parent"]) == ["written by the child", "p"]
    assert store.has_labels("v1", [f"child{i}" for i in range(50)]).all()
    version, recs = store.read_current_labels(["child7"])
    assert version == "v1"
    assert_same_record(recs[0], make_record("v1", "child7", seed=7))
    np.testing.assert_array_equal(store.get_embeddings("v1", ["x"])[0], np.full((1, DIM), 3.0))
    store.close()


_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from stores import EmbeddedStore, SoftLabelRecord
    store = EmbeddedStore(sys.argv[1])
    batch = 0
    while True:  # until SIGKILL
        recs = [SoftLabelRecord(query_id=f"b{batch}-{i}", teacher_version="v1",
                                candidate_ids=[f"c{j}" for j in range(32)],
                                scores=np.full(32, batch, np.float32),
                                query_embedding=np.full(8, batch, np.float32), logit_scale=20.0)
                for i in range(200)]
        store.put_labels(recs)
        store.put_embeddings("v1", [f"b{batch}-{i}" for i in range(200)],
                             np.full((200, 8), batch, np.float32))
        batch += 1
    """
)


def test_embedded_survives_sigkill_mid_write(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path)
    store.begin_version(make_info("v1"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not store.has_labels("v1", ["b5-0"])[0]:  # let several batches commit
            assert proc.poll() is None, "writer died on its own"
            assert time.monotonic() < deadline, "writer made no progress"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    store.close()

    with sqlite3.connect(tmp_path / "store.sqlite") as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        n_labels = raw.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        n_emb = raw.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
    assert n_labels % 200 == 0 and n_emb % 200 == 0 and n_labels >= 1200
    assert n_labels - n_emb in (0, 200)  # killed between or within a batch's two writes
    reopened = EmbeddedStore(tmp_path)
    batches = n_labels // 200
    qids = [f"b{b}-{i}" for b in range(batches) for i in range(200)]
    got = reopened.get_labels("v1", qids)
    assert all(r is not None for r in got)
    for b in range(batches):
        assert all(float(r.scores[0]) == b for r in got[b * 200 : (b + 1) * 200])  # type: ignore[union-attr]
    assert not reopened.has_labels("v1", [f"b{batches}-{i}" for i in range(200)]).any()
    assert reopened.get_version("v1").status == "writing"  # type: ignore[union-attr]
    reopened.complete_version("v1")  # and the store carries on
    reopened.set_current("v1")
    reopened.close()


def test_embedded_threads_share_one_store(tmp_path: Path) -> None:
    """Each thread gets its own connection; concurrent readers and a writer coexist."""
    from concurrent.futures import ThreadPoolExecutor

    store = EmbeddedStore(tmp_path)
    records = complete(store, "v1", n_labels=50)
    store.set_current("v1")

    def read(_: int) -> str:
        version, got = store.read_current_labels([r.query_id for r in records])
        assert all(g is not None for g in got)
        return version

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(read, range(40))) == {"v1"}
    store.close()
    assert store.current() == "v1"  # reopens lazily after close
