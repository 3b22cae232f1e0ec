"""benchmarks/closed_loop.py --quick, once per backend (embedded; Kafka + Redis from the
session's services): server, labeller and trainer as real subprocesses under the
simulator's traffic; the JSON has every field, every stage saw every event, nothing
failed, and no process of the run is left. The home is the serving tests' small home
with a bundle (``--no-prepare``: a `stack prepare` from scratch takes minutes); each run
takes ~40-50 s on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from codistill.app.export import export_bundle
from serving.bundle import BundleRegistry
from stores import open_configured_store

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STAGE_KEYS = {
    "simulator": {"impressions", "clicks", "events_written", "errors", "seconds", "events_per_s",
                  "model_version", "mean_propensity"},
    "server": {"rank_requests", "feedback_requests", "rank_requests_per_s",
               "rank_requests_per_s_peak", "events_written", "fallback_share", "lag"},
    "labeller": {"events", "candidates_embedded", "queries_labelled", "events_per_s",
                 "candidates_per_s", "caught_up_s", "drain_s", "lag", "summary"},
    "trainer": {"events", "batches", "optimizer_steps", "impressions_trained",
                "impressions_waiting", "label_hits", "label_misses", "events_per_s", "applied_s",
                "drain_s", "committed_s", "commit", "stop_s", "lag", "summary"},
    "end_to_end": {"events", "seconds", "events_per_s", "applied_seconds",
                   "applied_events_per_s", "from", "to"},
}
BACKEND_KEYS = {*STAGE_KEYS, "store", "stream", "services", "namespace", "topic", "home", "prepare_s", "startup_s",
                "events_produced", "events_in_log", "first_request_at_unix", "drain", "errors",
                "error_total", "left_running", "exit_codes", "load_average", "sampler_errors",
                "timeline", "run_s"}


def _ours(marker: str) -> list[str]:
    """Live processes whose command line or environment mentions ``marker``."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X") and (marker in cmd or marker.encode() in environ):
            out.append(f"{proc.name}: {cmd}")
    return out


@pytest.fixture(scope="module")
def prepared(serving_env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What ``codistill stack prepare`` leaves, small and fast: a copy of the serving home
    (data, teacher vectors, current student) with a serving bundle exported."""
    s0, _ = serving_env
    home = tmp_path_factory.mktemp("closed-loop") / "prepared"
    shutil.copytree(s0.home, home, ignore=lambda d, names: [
        n for n in names if Path(d) == s0.home and n in {"bundles", "events", "serving", "online"}])
    s = s0.model_copy(update={"home": home})
    with open_configured_store(s) as store:
        version = export_bundle(s, store).bundle_version
    BundleRegistry(s.bundles_dir).set_serving(version)
    return home


def _run(prepared: Path, tmp_path: Path, backend: str, *extra: str) -> dict:
    """The quick benchmark on ``backend`` as a subprocess; its backend's result, checked."""
    home, out = tmp_path / "bench", tmp_path / "closed-loop.json"
    cmd = [sys.executable, "benchmarks/closed_loop.py", "--quick", "--backends", backend,
           "--seed-home", str(prepared), "--no-prepare", "--home", str(home), "--out", str(out),
           *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    left = _ours(str(home))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not left, f"processes of the run still alive: {left}"
    assert "end-to-end events/s" in proc.stdout  # the table

    r = json.loads(out.read_text())
    assert r["benchmark"] == "closed-loop" and r["machine"]["cores"] >= 1
    assert r["config"]["quick"] and r["config"]["size"] == "small"
    assert r["config"]["impressions"] == 100 and list(r["backends"]) == [backend]
    b = r["backends"][backend]
    assert set(b) == BACKEND_KEYS, set(b) ^ BACKEND_KEYS
    for stage, keys in STAGE_KEYS.items():
        assert set(b[stage]) == keys, (stage, set(b[stage]) ^ keys)

    n, sim = b["events_produced"], b["simulator"]
    assert sim["impressions"] == 100 and sim["errors"] == 0
    assert n == b["events_in_log"] == sim["events_written"] == 100 + sim["clicks"] > 100
    assert b["server"]["rank_requests"] == 100 and b["server"]["events_written"] == n
    assert b["labeller"]["events"] == n and b["trainer"]["events"] == n  # every stage saw all
    assert b["labeller"]["candidates_embedded"] > 0 and b["labeller"]["queries_labelled"] > 0
    assert b["trainer"]["batches"] > 0 and b["trainer"]["summary"]["offsets"]
    trained = b["trainer"]["impressions_trained"]
    assert trained + b["trainer"]["impressions_waiting"] == 100
    assert b["trainer"]["summary"]["counters"]["impressions_joined"] == trained
    assert b["end_to_end"]["events"] == n
    for rate in (sim["events_per_s"], b["server"]["rank_requests_per_s"],
                 b["labeller"]["events_per_s"], b["labeller"]["candidates_per_s"],
                 b["trainer"]["events_per_s"], b["end_to_end"]["events_per_s"],
                 b["end_to_end"]["applied_events_per_s"]):
        assert rate is not None and rate > 0
    # the commit that covers every event comes last: after the trainer applied them
    assert 0 < b["trainer"]["applied_s"] <= b["end_to_end"]["seconds"]
    assert b["trainer"]["commit"] in ("checkpoint", "stop")
    assert b["drain"]["drained"] and b["drain"]["log_settled"]
    assert b["labeller"]["drain_s"] >= 0 and b["trainer"]["drain_s"] >= 0
    for stage in ("server", "labeller", "trainer"):
        lag = b[stage]["lag"]
        assert lag["events"]["max"] >= lag["events"]["final"] >= 0, stage
        assert lag["seconds"]["max"] >= 0, stage
    assert b["labeller"]["lag"]["events"]["final"] == 0 == b["trainer"]["lag"]["events"]["final"]
    assert b["labeller"]["lag"]["events"]["max"] > 0  # it had something to catch up on

    assert b["error_total"] == 0, b["errors"]
    assert set(b["exit_codes"]) == {"simulate", "server", "labeller", "trainer"}
    assert set(b["exit_codes"].values()) == {0} and b["left_running"] == []
    assert b["load_average"]["1m_max"] is not None and r["load_average_1m_at_end"] >= 0
    for name in ("server", "labeller", "trainer", "simulate"):
        assert (Path(b["home"]) / "logs" / f"{name}.log").exists(), name
    timeline = json.loads(Path(b["timeline"]).read_text())
    assert timeline["rows"] and len(timeline["rows"][0]) == len(timeline["columns"])
    assert not (prepared / "events").exists() and not (prepared / "online").exists(), \
        "the seed home is copied, never run in"
    return b


def test_quick_closed_loop_on_the_embedded_backends(prepared: Path, tmp_path: Path) -> None:
    b = _run(prepared, tmp_path, "embedded")
    assert b["store"] == b["stream"] == "embedded" and b["services"] == {}


@pytest.mark.integration
def test_quick_closed_loop_on_kafka_and_redis(prepared: Path, tmp_path: Path, redis_url: str,
                                              kafka_bootstrap: str) -> None:
    b = _run(prepared, tmp_path, "kafka-redis", "--redis-url", redis_url,
             "--kafka-bootstrap", kafka_bootstrap)
    assert (b["store"], b["stream"]) == ("redis", "kafka")
    assert b["services"] == {"redis": redis_url, "kafka": kafka_bootstrap}
    ns = b["namespace"]
    assert ns and b["topic"] == f"{ns}.events"
    client = redis.Redis.from_url(redis_url)
    try:  # services it did not start: its keys are removed, the services left running
        assert client.ping() and not list(client.scan_iter(f"{ns}:*", count=1000))
    finally:
        client.close()
