"""The Grafana dashboard and ``codistill monitor snapshot``, against a real Prometheus.

The dashboard is the contract's consumer: every metric it queries must be documented
in ``docs/metrics.md`` and every expr must parse in Prometheus. The snapshot test
exports a few ``codistill_serving_*`` series (a bundle swap halfway through) from a
``prometheus_client`` server that Prometheus scrapes through file-SD, then draws the
dashboard from them.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from codistill.app.monitor import (
    DEFAULT_DASHBOARD,
    PrometheusClient,
    PrometheusError,
    annotation_queries,
    load_dashboard,
    panel_queries,
    snapshot,
)
from codistill.app.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
METRIC = re.compile(r"codistill_[a-z_]+")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics_of(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in METRIC.findall(expr)}


def _documented() -> set[str]:
    """Series names of the tables in docs/metrics.md, abbreviations expanded:
    ``_x`` after a name is ``codistill_<component>_x``; ``..._x`` replaces as many
    trailing segments of the first name as ``x`` has."""
    names: set[str] = set()
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        if not line.startswith("| `codistill_"):
            continue
        base, *rest = re.findall(r"`([^`]+)`", line.split("|")[1])
        names.add(base)
        for short in rest:
            if short.startswith("..."):
                tail = short.removeprefix("...")
                segments = tail.strip("_").count("_") + 1
                names.add("_".join(base.split("_")[:-segments]) + tail)
            else:
                names.add("_".join(base.split("_")[:2]) + short)
    return names


def _targets_dir() -> Path:
    env = os.environ.get("CODISTILL_TEST_PROMETHEUS_TARGETS_DIR")
    path = Path(env) if env else Path(
        (ROOT / ".services" / "prometheus.targets_dir").read_text().strip())
    assert path.is_dir(), f"prometheus targets dir {path} does not exist"
    return path


# ---------------------------------------------------------------- dashboard structure
def test_dashboard_is_provisioned_with_the_datasource_uid() -> None:
    import yaml

    board = load_dashboard()
    assert DEFAULT_DASHBOARD == ROOT / "deploy" / "grafana" / "dashboards" / "codistill.json"
    assert board["uid"] == "codistill"
    assert board["templating"]["list"] == []  # exprs must run unchanged outside Grafana
    source = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml")
                            .read_text())["datasources"][0]
    uids = {p["datasource"]["uid"] for p in board["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in board["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/codistill.yml")
                              .read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_panels_use_only_documented_codistill_metrics() -> None:
    board = load_dashboard()
    queries = panel_queries(board)
    assert len(queries) >= 20
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    documented = _documented()
    for q in queries + [*annotation_queries(board)]:
        used = _metrics_of(q.expr)
        assert used, f"{q.expr!r} uses no codistill_ metric"
        assert used <= documented, f"undocumented {used - documented} in {q.expr!r}"
        assert "codistill:" not in q.expr and "$" not in q.expr  # no rules, no variables
        assert set(re.findall(r"\[([^\]]+)\]", q.expr)) <= {"1m"}  # no $__rate_interval
    for q in queries:
        if q.grouped_by_version:
            assert "{{model_version}}" in q.legend.replace(" ", ""), q
    assert {a.name for a in annotation_queries(board)} == {"Bundle swaps", "Gate decisions"}


def test_dashboard_exprs_parse_in_prometheus(prometheus_url: str) -> None:
    client = PrometheusClient(prometheus_url)
    board = load_dashboard()
    for q in [*panel_queries(board), *annotation_queries(board)]:
        client.query(q.expr)  # raises PrometheusError on a parse error


def test_client_reports_prometheus_errors(prometheus_url: str) -> None:
    with pytest.raises(PrometheusError, match="parse error"):
        PrometheusClient(prometheus_url).query("sum(codistill_serving_ready")
    with pytest.raises(PrometheusError, match="cannot reach"):
        PrometheusClient(f"http://127.0.0.1:{free_port()}", timeout=2).query("vector(1)")


# ---------------------------------------------------------------- snapshot
class _Exporter:
    """A fake server's metrics: traffic every 0.1 s, a swap v1 -> v2 on ``switch``."""

    def __init__(self, tag: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        p = "codistill_serving_"
        v, e = ["model_version"], ["endpoint"]
        self.rank = Histogram(p + "rank_latency_seconds", "", v, registry=r)
        self.latency = Histogram(p + "request_latency_seconds", "", e, registry=r)
        self.requests = Counter(p + "requests_total", "", e + ["status"], registry=r)
        self.in_flight = Gauge(p + "in_flight_requests", "", registry=r)
        self.queue = Gauge(p + "event_queue_depth", "", registry=r)
        self.candidates = Counter(p + "candidates_total", "", v, registry=r)
        self.fallbacks = Counter(p + "fallback_candidates_total", "", v, registry=r)
        self.impressions = Counter(p + "impressions_total", "", v, registry=r)
        self.feedback = Counter(p + "feedback_total", "", v + ["action"], registry=r)
        self.at_k = Counter(p + "feedback_at_k_total", "", v + ["action", "k"], registry=r)
        self.rr = Histogram(p + "reciprocal_rank", "", v + ["action"], registry=r)
        self.mmd = Gauge(p + "drift_mmd", "", v, registry=r)
        self.swaps = Counter(p + "swaps_total", "", registry=r)
        self.promotions = Counter(p + "promotions_total", "", registry=r)
        self.rollbacks = Counter(p + "rollbacks_total", "", registry=r)
        self.info = Gauge(p + "model_info", "", ["model_version", "slot", "kind",
                                                  "teacher_version", "precision"], registry=r)
        self.v1, self.v2 = f"v1-{tag}", f"v2-{tag}"
        self.version = self.v1
        self.info.labels(self.v1, "serving", "bow", "t1", "fp32").set(1)
        self.switch, self.stop = threading.Event(), threading.Event()
        self.exported = {p + n for n in (
            "rank_latency_seconds", "request_latency_seconds", "requests_total",
            "in_flight_requests", "event_queue_depth", "candidates_total",
            "fallback_candidates_total", "impressions_total", "feedback_total",
            "feedback_at_k_total", "reciprocal_rank", "drift_mmd", "swaps_total",
            "promotions_total", "rollbacks_total", "model_info")}

    def run(self) -> None:
        i = 0
        while not self.stop.wait(0.1):
            if self.switch.is_set() and self.version == self.v1:
                self.info.remove(self.v1, "serving", "bow", "t1", "fp32")
                self.info.labels(self.v1, "previous", "bow", "t1", "fp32").set(1)
                self.info.labels(self.v2, "serving", "bow", "t1", "fp32").set(1)
                self.swaps.inc()
                self.promotions.inc()
                self.version = self.v2
            v, i = self.version, i + 1
            self.rank.labels(v).observe(0.001 * (1 + i % 5))
            self.latency.labels("/v1/rank").observe(0.002)
            self.requests.labels("/v1/rank", "200").inc()
            self.in_flight.set(i % 3)
            self.candidates.labels(v).inc(20)
            self.fallbacks.labels(v).inc(i % 4)
            self.impressions.labels(v).inc()
            self.feedback.labels(v, "accept" if i % 3 else "click").inc()
            for k in ("1", "3", "10"):
                self.at_k.labels(v, "click", k).inc(int(k == "10" or i % 2))
            self.rr.labels(v, "click").observe(1 / (1 + i % 3))
            self.mmd.labels(v).set(0.01 * (i % 7))


@pytest.fixture(scope="module")
def exporter(prometheus_url: str) -> Iterator[_Exporter]:
    from prometheus_client import start_http_server

    tag = uuid.uuid4().hex[:10]
    exp = _Exporter(tag)
    port = free_port()
    server, server_thread = start_http_server(port, addr="127.0.0.1", registry=exp.registry)
    traffic = threading.Thread(target=exp.run, daemon=True)
    traffic.start()
    target = _targets_dir() / f"monitor-{tag}.json"
    tmp = target.with_suffix(".tmp")  # not matched by *.json: no half-written reads
    tmp.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {"itest": tag}}]))
    tmp.rename(target)
    client = PrometheusClient(prometheus_url)

    def wait_for(expr: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not client.query(expr):
            assert time.monotonic() < deadline, f"{expr} stayed empty for {timeout} s"
            time.sleep(0.25)

    try:
        sel = f'itest="{tag}"'
        wait_for(f"codistill_serving_candidates_total{{{sel}}}")
        time.sleep(1.5)  # a few v1 samples before the swap
        exp.switch.set()
        wait_for(f'rate(codistill_serving_candidates_total{{{sel}, model_version="{exp.v2}"}}[1m])')
        wait_for(f"changes(codistill_serving_swaps_total{{{sel}}}[1m]) > 0")
        yield exp
    finally:
        target.unlink(missing_ok=True)
        exp.stop.set()
        traffic.join(timeout=5)
        server.shutdown()
        server.server_close()
        server_thread.join(timeout=5)


def test_snapshot_draws_every_panel_from_prometheus(prometheus_url: str, exporter: _Exporter,
                                                    tmp_path: Path) -> None:
    result = snapshot(prometheus_url, tmp_path / "shot.png", minutes=1, step=1)
    assert result.png_path.read_bytes()[:8] == PNG_MAGIC
    summary = json.loads(result.json_path.read_text())
    assert result.json_path == tmp_path / "shot.json" and summary["png"] == "shot.png"
    board = load_dashboard()
    assert [p["id"] for p in summary["panels"]] == sorted({q.panel_id for q in panel_queries(board)})
    assert {p["id"]: p["series"] for p in summary["panels"]} == result.series_counts
    checked = 0
    for panel in summary["panels"]:
        for q in panel["queries"]:
            assert q["error"] is None, q
            if _metrics_of(q["expr"]) <= exporter.exported:
                assert q["series"], f"panel {panel['title']!r}: {q['expr']!r} returned nothing"
                assert all(s["points"] > 0 for s in q["series"])
                checked += 1
    assert checked >= 15
    by_title = {p["title"]: p for p in summary["panels"]}
    rank_legends = {s["legend"] for q in by_title["Rank latency by version"]["queries"]
                    for s in q["series"]}
    assert {f"p99 {exporter.v1}", f"p99 {exporter.v2}"} <= rank_legends  # the swap shows
    ctr = [s for s in by_title["CTR@k by version"]["queries"][0]["series"]
           if s["labels"].get("model_version") == exporter.v2]
    assert {s["labels"]["k"] for s in ctr} == {"1", "3", "10"}  # vector matching keeps k
    assert all(s["last"][1] is None or 0 <= s["last"][1] <= 1 for s in ctr)
    swaps = next(a for a in summary["annotations"] if a["name"] == "Bundle swaps")
    assert swaps["error"] is None and swaps["times"]


def test_monitor_snapshot_command(prometheus_url: str, exporter: _Exporter,
                                  tmp_path: Path) -> None:
    from codistill.app.monitor import monitor_app

    board = load_dashboard()
    small = dict(board, panels=[p for p in board["panels"]
                                if p.get("title") in ("Rank latency by version",
                                                      "Unknown-candidate (fallback) share by version")])
    (tmp_path / "small.json").write_text(json.dumps(small))
    app = typer.Typer()
    app.add_typer(monitor_app, name="monitor")
    app.command("noop")(lambda: None)  # a group with two commands keeps "monitor" a group
    out = tmp_path / "cli" / "s.png"
    result = CliRunner().invoke(
        app, ["monitor", "snapshot", "--out", str(out), "--minutes", "1",
              "--dashboard", str(tmp_path / "small.json")],
        env={"CODISTILL_PROMETHEUS_URL": prometheus_url, "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "Rank latency by version" in result.output
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert all(p["series"] > 0 for p in json.loads(out.with_suffix(".json").read_text())["panels"])
    bad = CliRunner().invoke(app, ["monitor", "snapshot", "--out", str(out), "--prometheus",
                                   f"http://127.0.0.1:{free_port()}"])
    assert bad.exit_code == 2 and "cannot reach" in bad.output
