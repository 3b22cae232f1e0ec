"""The serving vector cache in front of a real (embedded) store: LRU, outages, recovery."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from serving.vectors import VectorCache
from stores import open_store
from stores.base import StoreUnavailable
from tests.helpers.online import VERSION, fill_store, tiny_corpus


class _Flaky:
    """The real store; ``down`` makes every call fail, ``calls`` counts the reads."""

    def __init__(self, store) -> None:
        self.store, self.down, self.calls = store, False, 0

    def get_embeddings(self, version, ids, max_seq=None):
        self.calls += 1
        if self.down:
            raise StoreUnavailable("store down")
        return self.store.get_embeddings(version, ids, max_seq)


@pytest.fixture()
def store(tmp_path: Path):
    from codistill.config import StoreSettings

    with open_store(StoreSettings(path=tmp_path / "store")) as s:
        corpus = tiny_corpus()
        fill_store(s, corpus)
        yield s, sorted(corpus.texts)


def test_lru_keeps_the_most_recent_vectors(store) -> None:
    s, ids = store
    cache = VectorCache(s, VERSION, capacity=3)
    got = cache.get(ids[:4])
    assert got.found.all() and got.hits == 0 and len(cache) == 3
    again = cache.get(ids[1:4])
    assert again.hits == 3 and again.misses == 0
    np.testing.assert_array_equal(again.vectors, got.vectors[1:4])
    assert cache.get(["nope"]).misses == 1


def test_a_down_store_is_not_asked_again_until_a_probe_finds_it_back(store) -> None:
    """Circuit breaker: after a failure, requests take the fallback at once instead of
    waiting on the store (a hung Redis costs every request its socket timeout); a
    background probe finds the store's return."""
    s, ids = store
    flaky = _Flaky(s)
    cache = VectorCache(flaky, VERSION, probe_every_s=0.05)
    flaky.down = True
    assert cache.get(ids[:2]).store_failed
    calls = flaky.calls
    for _ in range(20):
        lookup = cache.get(ids[2:4])
        assert lookup.store_failed and not lookup.found.any()
    assert flaky.calls - calls <= 3  # only the probe's reads, not one per request
    assert cache.store_down_for() > 0
    flaky.down = False
    deadline = time.monotonic() + 5
    while cache.store_down_for() > 0:
        assert time.monotonic() < deadline, "the probe never found the store back"
        time.sleep(0.02)
    lookup = cache.get(ids[2:4])
    assert lookup.found.all() and not lookup.store_failed
