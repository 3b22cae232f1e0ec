"""``store.ttl_s`` on the embedded store: versions that are neither current, pinned nor
leased expire ``ttl_s`` after a sweep first finds them so; nothing protected ever does.

Before this test the embedded store ignored ``ttl_s`` (``open_store`` did not pass it on
and ``EmbeddedStore`` had no ``expire_stale_versions``), so an unpinned old version
stayed forever on the default backend. The Redis store's TTLs are tested in
``tests/integration/test_redis_store.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from codistill.config import StoreSettings
from stores import SoftLabelRecord, VersionError, VersionInfo, open_store

DIM = 4
TTL_S = 1


def _write(store, version: str, complete: bool = True) -> None:
    store.begin_version(VersionInfo(teacher_version=version, model="m", logit_scale=20.0,
                                    dim=DIM))
    store.put_embeddings(version, ["a", "b"], np.ones((2, DIM), np.float32))
    store.put_labels([SoftLabelRecord(query_id="q0", teacher_version=version,
                                      candidate_ids=["a", "b"],
                                      scores=np.array([0.5, 0.1], np.float32),
                                      query_embedding=np.ones(DIM, np.float32),
                                      logit_scale=20.0)])
    if complete:
        store.complete_version(version)


def test_embedded_store_expires_unprotected_versions_after_ttl(tmp_path: Path) -> None:
    store = open_store(StoreSettings(path=tmp_path / "store", ttl_s=TTL_S))
    for v in ("v1", "v2", "v3", "v5"):
        _write(store, v)
    _write(store, "v4", complete=False)  # still being written: never expired
    store.set_current("v3")
    store.pin("v2", "student:s")
    store.lease("v5", "trainer:t", ttl_s=60)

    assert store.expire_stale_versions() == ["v1"]
    deadline = store.expiring()["v1"]
    assert time.time() < deadline <= time.time() + TTL_S
    assert set(store.expiring()) == {"v1"}
    assert store.get_labels("v1", ["q0"])[0] is not None  # before the deadline: all there
    store.expire_stale_versions()
    assert store.expiring()["v1"] == deadline  # a second sweep does not push expiry back

    store.pin("v1", "server")  # pinning makes it permanent again ...
    assert "v1" not in store.expiring()
    time.sleep(TTL_S + 0.1)
    store.expire_stale_versions()
    assert store.get_version("v1") is not None  # ... even past the old deadline
    store.unpin("v1", "server")
    assert store.expire_stale_versions() == ["v1"]  # a fresh deadline
    assert store.get_version("v1") is not None

    time.sleep(TTL_S + 0.1)
    assert store.expire_stale_versions() == []
    assert store.get_version("v1") is None  # gone: manifest, labels, embeddings
    assert store.get_labels("v1", ["q0"]) == [None]
    assert not store.has_embeddings("v1", ["a"]).any()
    assert [i.teacher_version for i in store.versions()] == ["v2", "v3", "v5", "v4"]
    with pytest.raises(VersionError, match="unknown"):
        store.set_current("v1")

    store.release("v5", "trainer:t")  # a finished trainer's version gets a deadline ...
    store.unpin("v2", "student:s")
    assert sorted(store.expire_stale_versions()) == ["v2", "v5"]
    store.set_current("v2")  # ... and one that becomes current loses it again
    assert set(store.expiring()) == {"v5"}
    assert sorted(store.expire_stale_versions()) == ["v3", "v5"]  # the old current gets one
    time.sleep(TTL_S + 0.1)
    store.expire_stale_versions()
    assert [i.teacher_version for i in store.versions()] == ["v2", "v4"]
    assert store.read_current_labels(["q0"])[0] == "v2"
    store.close()


def test_without_ttl_nothing_expires(tmp_path: Path) -> None:
    store = open_store(StoreSettings(path=tmp_path / "store"))
    _write(store, "v1")
    _write(store, "v2")
    store.set_current("v2")
    assert store.expire_stale_versions() == []
    assert store.expiring() == {}
    assert store.get_version("v1") is not None
    store.close()
