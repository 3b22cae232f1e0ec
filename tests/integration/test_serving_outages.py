"""The ONNX server through real outages: a Redis store and a Kafka broker that die and return.

* **Store.** A private redis-server (fsync-always AOF, so a restart keeps the data)
  holds the teacher vectors the bundle pins. It is SIGKILLed under a running server:
  cached vectors keep serving, the other candidates take the fallback graph
  (``fallback: true``, counted), an id that is neither cached nor sent with its text
  gets a 503 that says why, ``/readyz`` turns false only after
  ``serving.store_unready_after_s`` and true again once the store is back (with no
  request needed to notice), and the vectors come from the store again.
* **Broker.** A private single-node KRaft broker (``tests.helpers.kafka_process``)
  carries the events topic. It is SIGKILLed while requests keep coming: every
  ``/v1/rank`` and ``/v1/feedback`` answers 200 without waiting for the broker, the
  outage shows in ``/metrics`` (broker errors, queue depth, drops), and after the
  broker returns exactly the events the sink reports as written are on the topic
  (written + dropped = submitted).

Both services are private to this module, so nothing else in the session loses them.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from codistill.app.export import export_bundle
from codistill.config import Settings
from codistill.ids import candidate_id
from serving.app import Server, create_app
from serving.commands import build_server
from stores import open_configured_store
from streaming import open_stream, parse_event
from tasks import dataset as ds
from teacher import workflow as wf
from tests.helpers.kafka_process import KafkaProcess
from tests.helpers.online import read_topic
from tests.helpers.redis_process import RedisProcess, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UNREADY_AFTER_S = 2.0  # serving.store_unready_after_s in this module
QUEUE = 6  # serving.event_queue in the broker test: small, so the outage overflows it


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    proc = RedisProcess(free_port(), tmp_path_factory.mktemp("redis"), durable=True)
    proc.start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaProcess]:
    broker = KafkaProcess(tmp_path_factory.mktemp("kafka"))
    broker.start()
    yield broker
    broker.kill()


@pytest.fixture(scope="module")
def env(serving_env, redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
        ) -> dict[str, Any]:
    """A copy of the shared serving home whose store is the private Redis; one bundle.

    The teacher version is precomputed into Redis (the embedding cache of the home
    makes that a few seconds) and the ``asym-bow`` student exported against it, so
    the bundle pins its teacher version there.
    """
    s0, students = serving_env
    home = tmp_path_factory.mktemp("outage-home")
    shutil.copytree(s0.home, home, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("bundles", "serving", "events", "store"))
    s = s0.model_copy(update={
        "home": home,
        "store": s0.store.model_copy(update={
            "backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_server.port}/0",
            "namespace": "outage", "path": None}),
        "serving": s0.serving.model_copy(update={"store_unready_after_s": UNREADY_AFTER_S})})
    teacher = wf.ensure_current(s)
    wf.precompute_version(s, teacher, {sp: ds.read_split(s, sp) for sp in ds.SPLITS}, False)
    store = open_configured_store(s)
    try:
        bundle = export_bundle(s, store, students["asym-bow"]).bundle_version
    finally:
        store.close()
    return {"settings": s, "bundle": bundle}


def _server(env: dict[str, Any], **changes: Any) -> Server:
    s: Settings = env["settings"].model_copy(update=changes)
    srv = build_server(s, bundle=env["bundle"])
    srv.sink.retry_for_s = 120.0  # an event waits out the outages of this module
    return srv


def _close(srv: Server) -> None:
    srv.sink.close(timeout_s=5)
    if srv.store is not None:
        srv.store.close()
    if srv.sink.producer is not None:
        srv.sink.producer.close()  # type: ignore[attr-defined]  # build_server's stream


# -- helpers ----------------------------------------------------------------------------------
def _metric(client: TestClient, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _event_metrics(client: TestClient) -> str:
    """The event and broker lines of ``/metrics`` (for failure messages)."""
    return "\n".join(line for line in client.get("/metrics").text.splitlines()
                     if not line.startswith("#") and ("event" in line or "broker" in line))


def _wait(predicate, timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step_s)


def _disjoint_lists(s: Settings, n: int) -> list[Any]:
    """``n`` test lists that share no candidate id (so none warms another's cache)."""
    out, seen = [], set()
    for ex in ds.read_split(s, "test"):
        if not seen & set(ex.candidate_ids):
            out.append(ex)
            seen |= set(ex.candidate_ids)
        if len(out) == n:
            return out
    raise AssertionError(f"fewer than {n} disjoint test lists")


def _by_id(ex: Any) -> list[dict[str, str]]:
    return [{"id": i} for i in ex.candidate_ids]


# -- the store ----------------------------------------------------------------------------------
def test_a_redis_outage_serves_cached_vectors_falls_back_for_the_rest_and_recovers(
        env, redis_server: RedisProcess, tmp_path) -> None:
    s: Settings = env["settings"]
    events_cfg = s.stream.model_copy(update={"path": tmp_path / "events"})
    srv = _server(env, stream=events_cfg)
    client = TestClient(create_app(srv))
    version = env["bundle"]
    try:
        warm, cold = _disjoint_lists(s, 2)
        n = len(warm.candidate_ids)
        before = client.post("/v1/rank", json={"query": warm.query, "top_k": n,
                                               "candidates": _by_id(warm)})
        assert before.status_code == 200, before.text
        assert not any(x["fallback"] for x in before.json()["results"])
        # a quiet store is not a down store: longer than the limit with cached lists only
        time.sleep(UNREADY_AFTER_S + 0.5)
        assert client.post("/v1/rank", json={"query": warm.query,
                                              "candidates": _by_id(warm)}).status_code == 200
        assert client.get("/readyz").status_code == 200

        redis_server.kill()
        errors0 = _metric(client, "codistill_serving_store_errors_total")
        fallbacks0 = _metric(client, "codistill_serving_fallback_candidates_total",
                             model_version=version)

        # cached vectors still serve, unchanged, without touching the store
        again = client.post("/v1/rank", json={"query": warm.query, "top_k": n,
                                              "candidates": _by_id(warm)})
        assert again.status_code == 200, again.text
        assert [(x["id"], x["fallback"]) for x in again.json()["results"]] == [
            (x["id"], False) for x in before.json()["results"]]
        np.testing.assert_allclose([x["score"] for x in again.json()["results"]],
                                   [x["score"] for x in before.json()["results"]], rtol=1e-6)
        assert _metric(client, "codistill_serving_store_errors_total") == errors0

        # the rest take the fallback graph: encoded from their text, marked, counted
        t_fail = time.monotonic()  # the outage is seen from the next request on
        new_code = "def outage_only_helper(rows):\n    return sorted(set(rows))[:3]"
        texts = [*cold.candidates, new_code]
        cands = [{"id": i, "text": t} for i, t in zip(cold.candidate_ids, cold.candidates,
                                                      strict=True)] + [{"text": new_code}]
        r = client.post("/v1/rank", json={"query": cold.query, "top_k": len(cands),
                                          "candidates": cands})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert all(x["fallback"] for x in results) and len(results) == len(cands)
        ranker = srv.host.serving.ranker
        want = ranker.scores(ranker.embed_queries([cold.query])[0], ranker.embed_candidates(texts))
        ids = [*cold.candidate_ids, candidate_id(new_code)]
        got = {x["id"]: x["score"] for x in results}
        np.testing.assert_allclose([got[i] for i in ids], want, rtol=1e-5, atol=1e-6)
        assert _metric(client, "codistill_serving_store_errors_total",
                       op="get_embeddings") == errors0 + 1
        assert _metric(client, "codistill_serving_fallback_candidates_total",
                       model_version=version) == fallbacks0 + len(cands)

        # an id that is neither cached nor sent with its text cannot be ranked: 503, why
        r = client.post("/v1/rank", json={"query": cold.query, "candidates": [
            *_by_id(warm), {"id": cold.candidate_ids[0]}]})
        assert r.status_code == 503, r.text
        assert "store unavailable" in r.json()["detail"]
        assert cold.candidate_ids[0] in r.json()["detail"]

        # /readyz: still true for store_unready_after_s after the first failure, then false
        ready = client.get("/readyz")
        if time.monotonic() - t_fail < UNREADY_AFTER_S:  # (unless this machine stalled)
            assert ready.status_code == 200, ready.text
        assert _wait(lambda: client.get("/readyz").status_code == 503, UNREADY_AFTER_S + 5)
        assert time.monotonic() - t_fail > UNREADY_AFTER_S
        r = client.get("/readyz")
        assert r.json()["ready"] is False and "store unreachable" in r.json()["detail"]
        assert _metric(client, "codistill_serving_ready") == 0

        # the store returns: /readyz notices by itself (an unready server gets no traffic)
        redis_server.start()
        assert _wait(lambda: client.get("/readyz").status_code == 200, 10), \
            client.get("/readyz").text
        # ... and the vectors come from the store again (same connection pool, reconnected)
        errors1 = _metric(client, "codistill_serving_store_errors_total", op="get_embeddings")
        r = client.post("/v1/rank", json={"query": cold.query, "candidates": _by_id(cold),
                                          "top_k": len(cold.candidate_ids)})
        assert r.status_code == 200, r.text
        assert not any(x["fallback"] for x in r.json()["results"])
        assert _metric(client, "codistill_serving_store_errors_total",
                       op="get_embeddings") == errors1

        # the new candidate's text was stored across the outage, before the impression
        assert srv.sink.flush(timeout_s=30)
        assert srv.store.get_texts([candidate_id(new_code)]) == [new_code]
        stream = open_stream(events_cfg)
        try:
            events = [parse_event(x.value) for x in read_topic(stream, s.stream.topic)]
        finally:
            stream.close()
        (imp,) = [e for e in events if e.type == "impression"
                  and candidate_id(new_code) in e.candidate_ids]
        assert sorted(imp.unknown_candidate_ids) == sorted(ids)
        assert _metric(client, "codistill_serving_events_dropped_total") == 0
    finally:
        _close(srv)


# -- the broker ---------------------------------------------------------------------------------
def test_a_kafka_outage_fails_no_request_and_the_queued_events_arrive(
        env, kafka_broker: KafkaProcess) -> None:
    s: Settings = env["settings"]
    topic = f"outage-{uuid.uuid4().hex[:8]}"
    stream_cfg = s.stream.model_copy(update={
        "backend": "kafka", "bootstrap_servers": kafka_broker.bootstrap, "topic": topic,
        "dlq_topic": topic + ".dlq", "partitions": 2})
    srv = _server(env, stream=stream_cfg,
                  serving=s.serving.model_copy(update={"event_queue": QUEUE}))
    client = TestClient(create_app(srv))
    lists = ds.read_split(s, "test")
    submitted = 0
    served: set[tuple[str, str]] = set()

    def rank_and_click(i: int) -> float:
        nonlocal submitted
        ex = lists[i % len(lists)]
        t0 = time.monotonic()
        r = client.post("/v1/rank", json={"query": ex.query, "candidates": _by_id(ex)})
        assert r.status_code == 200, r.text
        body = r.json()
        first = body["results"][0]["id"]
        f = client.post("/v1/feedback", json={"request_id": body["request_id"],
                                              "candidate_id": first, "action": "click"})
        assert f.status_code == 200, f.text
        submitted += 2
        served.update({("impression", body["request_id"]), ("feedback", body["request_id"])})
        return time.monotonic() - t0

    try:
        for i in range(3):
            rank_and_click(i)
        before_outage = set(served)
        assert srv.sink.flush(timeout_s=30)
        assert _metric(client, "codistill_serving_events_total") == submitted

        kafka_broker.kill()
        slowest = max(rank_and_click(i) for i in range(3, 23))
        assert slowest < 2.0, f"a request waited {slowest:.1f} s for the dead broker"
        assert client.get("/readyz").status_code == 200  # events do not gate readiness
        # the outage is visible: broker errors, a full queue, then drops
        assert _wait(lambda: _metric(client, "codistill_serving_broker_errors_total") > 0, 15), \
            f"no broker error counted 15 s into the outage:\n{_event_metrics(client)}"
        assert _metric(client, "codistill_serving_event_queue_depth") == QUEUE
        dropped = _metric(client, "codistill_serving_events_dropped_total", reason="queue_full")
        assert dropped > 0

        kafka_broker.start()
        assert srv.sink.flush(timeout_s=60)
        written = _metric(client, "codistill_serving_events_total")
        lost = _metric(client, "codistill_serving_events_dropped_total")
        assert written + lost == submitted and lost == dropped
        assert _metric(client, "codistill_serving_event_queue_depth") == 0

        reader = open_stream(stream_cfg)
        try:
            records = read_topic(reader, topic)
        finally:
            reader.close()
        events = [parse_event(x.value) for x in records]
        keys = [(e.type, e.request_id) for e in events]
        assert len(keys) == len(set(keys)) == written  # each reported event once, no more
        assert before_outage <= set(keys) <= served
    finally:
        if kafka_broker.proc is None or kafka_broker.proc.poll() is not None:
            kafka_broker.start()  # so that closing the producer does not wait 120 s
        _close(srv)
