"""The server's quality and drift signals on a real home: feedback counters, teacher
agreement, OOV share, MMD drift, detectors, and series removed with their bundle."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from codistill.app.export import export_bundle, fuzz_strings
from codistill.config import MonitorSettings
from codistill.ids import query_id
from serving.app import create_app
from serving.bundle import BundleRegistry
from serving.commands import build_server
from serving.monitor import Observation, QualityMonitor, agreement
from serving.runtime import OnnxRanker
from serving.telemetry import ServingMetrics
from stores import open_configured_store
from tasks import dataset as ds
from tests.helpers.serving import close_server


@pytest.fixture(scope="module")
def env(serving_env, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    s, students = serving_env
    s = s.model_copy(update={
        "serving": s.serving.model_copy(update={
            "monitor": MonitorSettings(agreement_sample=1.0, mmd_window=40, mmd_every=10,
                                       hold_s=3600)}),
        "stream": s.stream.model_copy(update={"path": tmp_path_factory.mktemp("events")})})
    store = open_configured_store(s)
    try:
        version = export_bundle(s, store, students["asym-bow"]).bundle_version
    finally:
        store.close()
    return {"settings": s, "version": version}


@pytest.fixture()
def server(env):
    srv = build_server(env["settings"], bundle=env["version"])
    yield srv
    close_server(srv)


def _value(m: ServingMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_agreement_is_zero_kl_and_full_ndcg_only_for_the_teachers_own_order() -> None:
    t = np.array([5.0, 3.0, 1.0, 0.0])
    kl_same, ndcg_same = agreement(t.copy(), t)
    kl_rev, ndcg_rev = agreement(t[::-1].copy(), t)
    assert kl_same == pytest.approx(0.0, abs=1e-9) and ndcg_same == pytest.approx(1.0)
    assert kl_rev > 1.0 and ndcg_rev < ndcg_same


def test_rank_and_feedback_feed_online_quality_and_teacher_agreement(env, server) -> None:
    s, v = env["settings"], env["version"]
    client = TestClient(create_app(server))
    lists = ds.read_split(s, "valid")
    positions = []
    for ex in lists:
        r = client.post("/v1/rank", json={"query": ex.query, "top_k": 5, "candidates": [
            {"id": i, "text": t} for i, t in zip(ex.candidate_ids, ex.candidates, strict=True)]})
        assert r.status_code == 200, r.text
        body = r.json()
        pick = body["results"][len(positions) % 3]
        positions.append(pick["rank"])
        f = client.post("/v1/feedback", json={"request_id": body["request_id"],
                                              "candidate_id": pick["id"], "action": "click"})
        assert f.status_code == 200, f.text
    server.monitor.drain()
    client.get("/metrics")
    m = server.metrics
    n = len(lists)
    assert _value(m, "codistill_serving_impressions_total", model_version=v) == n
    assert _value(m, "codistill_serving_feedback_total", model_version=v, action="click") == n
    for k in (1, 3, 10):
        assert _value(m, "codistill_serving_feedback_at_k_total", model_version=v,
                      action="click", k=str(k)) == sum(p <= k for p in positions)
    rr = "codistill_serving_reciprocal_rank"
    assert _value(m, rr + "_sum", model_version=v, action="click") == pytest.approx(
        sum(1 / p for p in positions))
    # every valid query has a teacher label in this home: each one is measured
    assert _value(m, "codistill_serving_agreement_kl_count", model_version=v) == n
    mean_ndcg = (_value(m, "codistill_serving_agreement_ndcg_sum", model_version=v) / n)
    assert 0.3 < mean_ndcg <= 1.0  # a distilled student mostly keeps the teacher's order
    assert _value(m, "codistill_serving_query_tokens_total", model_version=v) > n
    text = client.get("/metrics").text
    for signal in ("oov_share", "unknown_candidates", "query_embedding", "agreement_kl"):
        assert f'codistill_serving_drift_state{{model_version="{v}",signal="{signal}"}}' in text


def _observations(ranker: OnnxRanker, texts: list[str], version: str, oov: float
                  ) -> list[Observation]:
    ref = ranker.folder / ranker.card.drift["reference"]
    return [Observation(version, ranker.card.teacher_version, query_id(t), vec, ("a", "b"),
                        np.zeros(2, np.float32), oov, 0.0, ref)
            for t, vec in zip(texts, ranker.embed_queries(texts), strict=True)]


def _held(env: dict[str, Any]) -> tuple[OnnxRanker, ServingMetrics]:
    """The bundle opened, and metrics that hold it as the serving version."""
    reg = BundleRegistry(env["settings"].bundles_dir)
    ranker = OnnxRanker(reg.path(env["version"]), reg.verify(env["version"]))
    metrics = ServingMetrics()
    metrics.set_slot(env["version"], "serving", "asym-bow", ranker.card.teacher_version, "fp32")
    return ranker, metrics


def test_a_query_shift_raises_mmd_and_the_detectors_fire(env) -> None:
    s, v = env["settings"], env["version"]
    ranker, metrics = _held(env)
    # a tiny home (40 training queries): small windows, tested every 2 queries, so
    # the detector sees enough windows of each phase
    mon = QualityMonitor(MonitorSettings(mmd_window=20, mmd_every=2, hold_s=3600),
                         metrics, labels=None)
    train = [ex.query for ex in ds.read_split(s, "train")]
    random.Random(0).shuffle(train)  # the file is ordered by package: traffic is not
    for obs in _observations(ranker, (train * 4)[:160], v, oov=0.02):
        mon.process(obs)
    calm = _value(metrics, "codistill_serving_drift_mmd", model_version=v)
    events = "codistill_serving_drift_events_total"
    assert _value(metrics, events, model_version=v, signal="query_embedding") == 0
    assert _value(metrics, events, model_version=v, signal="oov_share") == 0
    noise = fuzz_strings(400, seed=7)  # not code search queries at all
    for obs in _observations(ranker, noise, v, oov=0.6):
        mon.process(obs)
    shifted = _value(metrics, "codistill_serving_drift_mmd", model_version=v)
    assert shifted > 3 * max(calm, 1e-3)
    assert _value(metrics, events, model_version=v, signal="query_embedding") >= 1
    assert _value(metrics, events, model_version=v, signal="oov_share") >= 1
    assert _value(metrics, "codistill_serving_drift_state", model_version=v,
                  signal="oov_share") == 1


def test_an_unloaded_versions_series_are_removed_and_stay_gone(env) -> None:
    v = env["version"]
    ranker, metrics = _held(env)
    mon = QualityMonitor(MonitorSettings(), metrics, labels=None)
    obs = _observations(ranker, ["read a file"], v, oov=0.0)[0]
    mon.process(obs)
    metrics.observe_feedback(v, "click", 2)
    assert _value(metrics, "codistill_serving_drift_state", model_version=v, signal="oov_share") == 0
    metrics.forget(v)
    mon.process(obs)  # a late request of the unloaded bundle
    mon.refresh()
    from prometheus_client import generate_latest

    assert f'model_version="{v}"' not in generate_latest(metrics.registry).decode()


def test_a_lagging_monitor_skips_and_counts_instead_of_blocking(env) -> None:
    metrics = ServingMetrics()
    mon = QualityMonitor(MonitorSettings(queue=2), metrics, labels=None)  # not started
    obs = Observation("v", "t", "q", np.zeros(4, np.float32), (), np.zeros(0), 0.0, 0.0)
    assert [mon.submit(obs) for _ in range(4)] == [True, True, False, False]
    assert _value(metrics, "codistill_serving_agreement_skipped_total", reason="queue_full") == 2
