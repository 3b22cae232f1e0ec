"""The HTTP server on a real home: ranking, fallback, feedback, limits, events, admin, swaps."""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any

import numpy as np
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from codistill.app.export import export_bundle
from codistill.config import Settings
from codistill.ids import candidate_id
from serving.app import create_app
from serving.bundle import BundleRegistry
from serving.commands import build_server
from serving.schemas import RankRequest
from stores import open_configured_store
from stores.base import StoreUnavailable as StoreUnavailableError
from streaming import open_stream, parse_event
from streaming.base import StreamUnavailable
from student.asym import StoreCandidates
from student.registry import student_registry
from tasks import dataset as ds
from tests.helpers.online import read_topic
from tests.helpers.redis_process import free_port
from tests.helpers.serving import close_server, serve_in_thread

KEY = "s3cret-admin-key"


@pytest.fixture(scope="module")
def env(serving_env, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Bundles of both students; serving settings with an admin key and a fresh event log."""
    s, students = serving_env
    s = s.model_copy(update={
        "serving": s.serving.model_copy(update={"admin_api_key": KEY, "max_candidates": 50}),
        "stream": s.stream.model_copy(update={"path": tmp_path_factory.mktemp("events")})})
    store = open_configured_store(s)
    try:
        bundles = {k: export_bundle(s, store, v).bundle_version for k, v in students.items()}
        bundles["asym-int8"] = export_bundle(s, store, students["asym-bow"],
                                             precision="int8").bundle_version
    finally:
        store.close()
    BundleRegistry(s.bundles_dir).set_serving(bundles["asym-bow"])
    return {"settings": s, "students": students, "bundles": bundles}


@pytest.fixture()
def server(env):
    srv = build_server(env["settings"], bundle=env["bundles"]["asym-bow"])
    yield srv
    close_server(srv)


@pytest.fixture()
def client(server) -> TestClient:
    return TestClient(create_app(server))


def _events(s: Settings) -> list[Any]:
    stream = open_stream(s.resolved_stream())
    try:
        return [parse_event(r.value) for r in read_topic(stream, s.stream.topic)]
    finally:
        stream.close()


def test_rank_by_id_matches_the_torch_student_and_emits_an_impression(env, server, client):
    s = env["settings"]
    ex = ds.read_split(s, "test")[0]
    r = client.post("/v1/rank", json={"query": ex.query, "top_k": 5,
                                      "candidates": [{"id": i} for i in ex.candidate_ids]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == env["bundles"]["asym-bow"] and len(body["results"]) == 5
    store = open_configured_store(s)
    try:
        model = student_registry(s.home).load(
            env["students"]["asym-bow"],
            candidate_source=StoreCandidates(store, store.current() or ""))
        want = model.score(ex.query, ex.candidates, ex.candidate_ids)
    finally:
        store.close()
    order = np.argsort(-want, kind="stable")[:5]
    assert [x["id"] for x in body["results"]] == [ex.candidate_ids[i] for i in order]
    np.testing.assert_allclose([x["score"] for x in body["results"]], want[order], atol=1e-4)
    assert not any(x["fallback"] for x in body["results"])
    assert server.sink.flush()
    imps = [e for e in _events(s) if e.request_id == body["request_id"]]
    assert len(imps) == 1 and imps[0].schema_version == 2
    assert imps[0].candidate_ids == [x["id"] for x in body["results"]]
    assert imps[0].unknown_candidate_ids == []


def test_an_unknown_candidate_with_text_takes_the_fallback_and_its_text_is_stored(env, server,
                                                                                   client):
    s = env["settings"]
    ex = ds.read_split(s, "valid")[0]
    new_code = "def brand_new_helper(path):\n    return open(path).read().splitlines()"
    cands = [{"id": i} for i in ex.candidate_ids] + [{"text": new_code}]
    body = client.post("/v1/rank", json={"query": ex.query, "candidates": cands,
                                         "top_k": len(cands)}).json()
    new_id = candidate_id(new_code)
    flags = {x["id"]: x["fallback"] for x in body["results"]}
    assert flags.pop(new_id) is True and not any(flags.values())
    assert server.sink.flush()
    (imp,) = [e for e in _events(s) if e.request_id == body["request_id"]]
    assert imp.unknown_candidate_ids == [new_id]
    assert server.store.get_texts([new_id]) == [new_code]  # for the teacher to embed later
    metrics = client.get("/metrics").text
    assert (f'codistill_serving_fallback_candidates_total{{model_version='
            f'"{body["model_version"]}"}} 1.0') in metrics
    r = client.post("/v1/feedback", json={"request_id": body["request_id"],
                                          "candidate_id": new_id, "action": "click"})
    assert r.status_code == 200
    assert server.sink.flush()
    (click,) = [e for e in _events(s) if e.type == "feedback"
                and e.request_id == body["request_id"]]
    assert click.unknown_candidate is True  # so the trainer's store check lets it through


@pytest.mark.parametrize(("payload", "status", "detail"), [
    ({"query": "q", "candidates": []}, 422, "candidates: List should have at least 1"),
    ({"query": "", "candidates": [{"text": "x"}]}, 422, "query: String should have at least"),
    ({"query": "q", "candidates": [{}]}, 422, "candidates[0]: give an id, a text or both"),
    ({"query": "q", "candidates": [{"id": "nope"}]}, 422, "unknown candidate id 'nope' sent "
                                                           "without text"),
    ({"query": "q", "candidates": [{"id": "x", "text": "def f(): pass"}]}, 422,
     "is not the content hash of its text"),
    ({"query": "q", "candidates": [{"text": "a"}, {"text": "a"}]}, 422, "duplicate id"),
    ({"query": "q", "candidates": [{"text": str(i)} for i in range(51)]}, 422,
     "serving.max_candidates = 50"),
    ({"query": "q" * 2001, "candidates": [{"text": "a"}]}, 422, "serving.max_query_chars"),
    ({"query": "q", "candidates": [{"text": "a" * 20001}]}, 422, "serving.max_text_chars"),
    ({"query": 3, "candidates": [{"text": "a"}]}, 422, "query: Input should be a valid string"),
    ({"query": "q", "candidates": [{"text": "a"}], "top_k": 0}, 422, "top_k"),
    ({"query": "q", "candidates": [{"text": "a"}], "extra": 1}, 422, "extra"),
])
def test_bad_requests_get_a_4xx_with_a_reason(client, payload, status, detail):
    r = client.post("/v1/rank", json=payload)
    assert r.status_code == status and detail in r.json()["detail"], r.text


def test_user_supplied_ids_accept_any_name(env):
    s = env["settings"]
    s = s.model_copy(update={"serving": s.serving.model_copy(update={"user_supplied_ids": True})})
    srv = build_server(s, bundle=env["bundles"]["asym-bow"])
    try:
        r = TestClient(create_app(srv)).post("/v1/rank", json={
            "query": "read a file", "candidates": [{"id": "my/lib.py::f", "text": "def f(): 1"}]})
        assert r.status_code == 200 and r.json()["results"][0]["fallback"] is True
    finally:
        srv.sink.close()
        srv.store.close()


def test_feedback_gets_its_position_from_the_impression(env, server, client):
    ex = ds.read_split(env["settings"], "valid")[1]
    body = client.post("/v1/rank", json={"query": ex.query, "candidates": [
        {"id": i} for i in ex.candidate_ids]}).json()
    third = body["results"][2]["id"]
    r = client.post("/v1/feedback", json={"request_id": body["request_id"],
                                          "candidate_id": third, "action": "click"})
    assert r.status_code == 200 and r.json()["position"] == 3
    assert client.post("/v1/feedback", json={"request_id": "never", "candidate_id": third,
                                             "action": "click"}).status_code == 404
    r = client.post("/v1/feedback", json={"request_id": body["request_id"],
                                          "candidate_id": "not-shown", "action": "click"})
    assert r.status_code == 422 and "was not shown" in r.json()["detail"]
    assert server.sink.flush()
    fbs = [e for e in _events(env["settings"]) if e.type == "feedback"
           and e.request_id == body["request_id"]]
    assert [(f.candidate_id, f.position, f.action) for f in fbs] == [(third, 3, "click")]


def test_feedback_passes_the_clients_propensity_into_the_v2_event(env, server, client):
    ex = ds.read_split(env["settings"], "valid")[2]
    body = client.post("/v1/rank", json={"query": ex.query, "candidates": [
        {"id": i} for i in ex.candidate_ids]}).json()
    first, second = (x["id"] for x in body["results"][:2])
    click = {"request_id": body["request_id"], "action": "click"}
    for bad in (0, 1.5, -0.25, "often"):
        r = client.post("/v1/feedback", json={**click, "candidate_id": second, "propensity": bad})
        assert r.status_code == 422 and r.json()["detail"].startswith("propensity: "), r.text
    r = client.post("/v1/feedback", json={**click, "candidate_id": second, "propensity": 0.5})
    assert r.status_code == 200 and r.json()["position"] == 2
    assert client.post("/v1/feedback", json={**click, "candidate_id": first,
                                             "propensity": 1}).status_code == 200
    assert client.post("/v1/feedback", json={**click, "candidate_id": first}).status_code == 200
    assert server.sink.flush()
    fbs = [e for e in _events(env["settings"]) if e.type == "feedback"
           and e.request_id == body["request_id"]]
    assert [(f.candidate_id, f.position, f.propensity, f.schema_version) for f in fbs] == [
        (second, 2, 0.5, 2), (first, 1, 1.0, 2), (first, 1, None, 2)]
    schema = client.get("/openapi.json").json()["components"]["schemas"]["FeedbackRequest"]
    documented = json.dumps(schema["properties"]["propensity"])
    assert '"exclusiveMinimum": 0' in documented and '"maximum": 1' in documented
    assert "examination probability" in documented


class _DownProducer:
    """A broker that refuses every write (the real one is in the Kafka outage test)."""

    def send(self, topic: str, key: str, value: bytes) -> None:
        raise StreamUnavailable("broker down")

    def flush(self) -> None:
        raise StreamUnavailable("broker down")


def test_a_broker_outage_never_fails_a_request(server, client):
    server.sink.producer = _DownProducer()
    server.sink.retry_for_s = 0.2
    for _ in range(5):
        r = client.post("/v1/rank", json={"query": "parse json",
                                          "candidates": [{"text": "def f(): pass"}]})
        assert r.status_code == 200
    deadline = time.monotonic() + 10
    while server.sink._q.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    metrics = client.get("/metrics").text
    assert 'codistill_serving_events_dropped_total{reason="broker"} 5.0' in metrics
    assert "codistill_serving_broker_errors_total" in metrics


def test_health_readiness_and_metrics(env, client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    text = client.get("/metrics").text
    version = env["bundles"]["asym-bow"]
    assert f'model_version="{version}",precision="fp32",slot="serving"' in text
    assert "codistill_serving_request_latency_seconds_bucket" in text


def test_admin_needs_the_key_and_every_change_is_audited(env, server, client):
    b = env["bundles"]
    assert client.get("/v1/admin/bundles").status_code == 401
    assert client.get("/v1/admin/bundles", headers={"X-API-Key": "wrong"}).status_code == 401
    h = {"X-API-Key": KEY}
    listed = {x["version"]: x["slot"] for x in client.get("/v1/admin/bundles", headers=h).json()}
    assert listed[b["asym-bow"]] == "serving" and b["bow"] in listed
    assert client.post("/v1/admin/rollback", headers=h).status_code == 409  # nothing before
    r = client.post("/v1/admin/promote", json={"version": b["bow"]}, headers=h).json()
    assert (r["serving"], r["previous"]) == (b["bow"], b["asym-bow"])
    rank = client.post("/v1/rank", json={"query": "q", "candidates": [{"text": "def f(): 1"}]})
    assert rank.json()["model_version"] == b["bow"]
    r = client.post("/v1/admin/rollback", headers=h).json()
    assert (r["serving"], r["previous"]) == (b["asym-bow"], b["bow"])
    assert BundleRegistry(env["settings"].bundles_dir).pointer().serving == b["asym-bow"]
    r = client.post("/v1/admin/promote", json={"version": "no-such-bundle"}, headers=h)
    assert r.status_code == 422 and "no bundle 'no-such-bundle'" in r.json()["detail"]
    audit = [json.loads(line) for line in
             (env["settings"].home / "serving" / "audit.jsonl").read_text().splitlines()]
    assert [(a["action"], a["ok"]) for a in audit[-3:]] == [
        ("promote", True), ("rollback", True), ("load", False)]  # the refusal is audited too
    text = client.get("/metrics").text
    assert "codistill_serving_rollbacks_total 1.0" in text


@pytest.mark.parametrize("key", [None, ""])  # an empty variable must not open the admin API
def test_admin_is_off_without_a_key(env, key):
    s = env["settings"]
    s = s.model_copy(update={"serving": s.serving.model_copy(update={"admin_api_key": key})})
    srv = build_server(s, bundle=env["bundles"]["asym-bow"])
    try:
        r = TestClient(create_app(srv)).post("/v1/admin/rollback", headers={"X-API-Key": ""})
        assert r.status_code == 404 and "admin API disabled" in r.json()["detail"]
    finally:
        srv.sink.close()
        srv.store.close()


def test_hot_swaps_under_load_fail_no_request(env, server):
    """Requests in flight across every swap; both versions answer; zero failures."""
    port = free_port()
    with serve_in_thread(server, port):
        ex = ds.read_split(env["settings"], "test")[2]
        payload = json.dumps({"query": ex.query, "candidates": [
            {"id": i} for i in ex.candidate_ids]}).encode()
        stop = threading.Event()
        seen: list[str] = []
        failures: list[Any] = []

        def load() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            while not stop.is_set():
                try:
                    conn.request("POST", "/v1/rank", payload, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    body = resp.read()
                    if resp.status != 200:
                        failures.append((resp.status, body[:200]))
                    else:
                        seen.append(json.loads(body)["model_version"])
                except Exception as exc:  # any transport error is a failed request
                    failures.append(repr(exc))
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        b = env["bundles"]
        versions = [b["asym-int8"], b["asym-bow"]] * 4
        try:
            for v in versions:
                time.sleep(0.15)
                server.host.promote(v, reason="test")
            time.sleep(0.15)
        finally:
            stop.set()
            for w in workers:
                w.join(10)
        assert failures == []
    assert {b["asym-int8"], b["asym-bow"]} <= set(seen) and len(seen) > 50


def test_series_of_a_bundle_no_longer_held_are_removed(env, server, client):
    b = env["bundles"]
    rank = {"query": "read a file", "candidates": [{"text": "def f(p):\n    return open(p)"}]}
    assert client.post("/v1/rank", json=rank).json()["model_version"] == b["asym-bow"]
    server.host.promote(b["bow"])
    client.post("/v1/rank", json=rank)
    server.host.promote(b["asym-int8"])  # serving int8, previous bow: fp32 is unloaded
    text = client.get("/metrics").text
    assert f'model_version="{b["asym-bow"]}"' not in text
    for version, slot in ((b["asym-int8"], "serving"), (b["bow"], "previous")):
        assert f'model_version="{version}",precision=' in text and f'slot="{slot}"' in text
    assert f'codistill_serving_rank_latency_seconds_count{{model_version="{b["bow"]}"}} 1.0' in text


class _OneFailingCall:
    """The real store, except that one chosen id's lookup fails (after a gate opens)."""

    def __init__(self, store, failing_id: str) -> None:
        self.store, self.failing_id = store, failing_id
        self.first_inside, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def get_embeddings(self, version, ids, max_seq=None):
        if self.failing_id in ids:
            raise StoreUnavailableError("store down for this call")
        self.first_inside.set()
        self.release.wait(10)
        return self.store.get_embeddings(version, ids, max_seq)


def test_another_requests_store_failure_does_not_turn_a_422_into_a_503(env, server):
    """Per-request accounting: request A names an id the store truly lacks (a 422);
    while A's lookup is in flight, request B's lookup fails (a store error of B's)."""
    lo = server.host.serving
    wrapped = _OneFailingCall(lo.vectors.store, "cb-fails")
    lo.vectors.store = wrapped
    ex = ds.read_split(env["settings"], "test")[3]
    results: dict[str, Any] = {}

    def request_a() -> None:
        try:
            server.rank(RankRequest(query=ex.query, candidates=[{"id": "never-stored"}]))
        except HTTPException as exc:
            results["a"] = exc.status_code

    try:
        a = threading.Thread(target=request_a)
        a.start()
        assert wrapped.first_inside.wait(10)
        with pytest.raises(HTTPException) as b:
            server.rank(RankRequest(query=ex.query, candidates=[{"id": "cb-fails"}]))
        assert b.value.status_code == 503  # B's own store call failed
        wrapped.release.set()
        a.join(10)
    finally:
        lo.vectors.store = wrapped.store
    assert results["a"] == 422
