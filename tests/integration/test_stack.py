"""The no-Docker stack end to end: ``scripts/stack.sh up`` starts real Redis, Kafka and
Prometheus (with the project's alert rules), prepares a home, runs server, trainer,
watcher and traffic; Prometheus scrapes them under traffic whose query source switches
midway; every dashboard panel's PromQL returns data; the snapshot renders; and
``stack.sh down`` leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from codistill.app.monitor import PrometheusClient, load_dashboard, panel_queries, snapshot
from tests.helpers.redis_process import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
APPS = ("server", "labeller", "trainer", "watcher", "traffic")


def _stack(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "stack.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _pids(state: Path) -> list[int]:
    files = [*state.glob("*.pid"), *state.glob("services/*/*.pid")]
    return [int(f.read_text().strip()) for f in files if f.read_text().strip()]


def _ours(state: Path) -> list[str]:
    """Command lines of live processes that mention the stack's state folder."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(state) in cmd or str(state).encode() in environ:
            out.append(f"{proc.name}: {cmd}")
    return out


def _until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("stack")
    ports = {k: str(free_port()) for k in ("REDIS", "KAFKA", "KAFKA_CONTROLLER", "PROMETHEUS",
                                           "SERVER", "TRAINER", "WATCHER", "LABELLER")}
    env = {**os.environ, "CODISTILL_STACK_STATE": str(state),
           **{f"CODISTILL_STACK_{k}_PORT": v for k, v in ports.items()},
           # a switch of the query source after 300 requests (15 s): the drift panels move
           "CODISTILL_TRAFFIC__SWITCH_AFTER": "300",
           "CODISTILL_WATCHER__INTERVAL_S": "5",
           # impressions join after 10 s instead of 60: the trainer's loss shows sooner
           "CODISTILL_ONLINE__WINDOW_S": "10", "CODISTILL_ONLINE__ALLOWED_LATENESS_S": "2"}
    env = {k: v for k, v in env.items() if not k.startswith("CODISTILL_TEST_")}
    up = _stack(env, "up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"env": env, "state": state, "ports": ports, "up": up}
    finally:
        down = _stack(env, "down", timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr


def test_up_prints_every_url_and_status_lists_every_process(stack) -> None:
    p = stack["ports"]
    for port in (p["SERVER"], p["TRAINER"], p["WATCHER"], p["PROMETHEUS"]):
        assert f"127.0.0.1:{port}" in stack["up"].stdout
    status = _stack(stack["env"], "status").stdout
    for name in ("redis", "kafka", "prometheus", *APPS):
        assert any(line.startswith(name) and "running" in line
                   for line in status.splitlines()), status


def test_the_server_ranks_what_the_readme_curls(stack) -> None:
    body = json.dumps({"query": "read a json file", "top_k": 2, "candidates": [
        {"text": "def load(path):\n    return json.load(open(path))"},
        {"text": "def add(a, b):\n    return a + b"}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{stack['ports']['SERVER']}/v1/rank",
                                 data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        answer = json.load(r)
    assert [x["rank"] for x in answer["results"]] == [1, 2] and answer["model_version"]


def test_every_dashboard_panel_returns_data_under_traffic(stack, tmp_path) -> None:
    prom = PrometheusClient(f"http://127.0.0.1:{stack['ports']['PROMETHEUS']}")
    queries = panel_queries(load_dashboard())
    assert len(queries) >= 20

    def empty() -> list[str]:
        return [q.title for q in queries if not prom.query(q.expr)]

    # the traffic's second source (a guard set) starts after 300 requests
    _until(lambda: not empty(), 240, "data in every panel (still empty: see below)")
    for q in queries:
        assert "codistill_" in q.expr, q.title
        result = prom.query(q.expr)
        assert result, f"{q.title}: {q.expr} returned nothing"
        if q.grouped_by_version:
            assert all("model_version" in r["metric"] for r in result), (q.title, result)
    # the alert rules are loaded and evaluated by the stack's Prometheus
    with urllib.request.urlopen(f"{prom.base_url}/api/v1/rules", timeout=10) as r:
        groups = json.load(r)["data"]["groups"]
    assert {g["name"] for g in groups} >= {"codistill-recording", "codistill-alerts"}
    result = snapshot(prom.base_url, tmp_path / "stack.png", minutes=5)
    assert (tmp_path / "stack.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(1 for n in result.series_counts.values() if n) == len(
        {q.panel_id for q in queries})


def test_down_leaves_no_process_behind(stack) -> None:
    state = stack["state"]
    pids = _pids(state)
    assert len(pids) >= 7
    down = _stack(stack["env"], "down", timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    alive = [p for p in pids if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().split(")")[-1][:3]]
    assert alive == [], alive
    assert _ours(state) == []
    status = _stack(stack["env"], "status").stdout
    assert "running" not in status, status
