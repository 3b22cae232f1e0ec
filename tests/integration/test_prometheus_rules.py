"""The Prometheus recording/alerting rules and the compose scrape config are valid.

``promtool`` (the Debian package scripts/install_system.sh installs) checks the
syntax and runs the rule unit tests in deploy/prometheus/tests/; the checks here
add what promtool cannot know: that every metric the rules name is one codistill
documents (docs/metrics.md is the contract, and a typo'd name silently matches
nothing), and that every alert carries what on-call needs and is unit-tested.
No skips: a missing promtool fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from codistill.config import ServingSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "codistill.yml"
RULE_TESTS = PROM / "tests" / "codistill_test.yml"
CONFIG = PROM / "prometheus.yml"
METRICS_DOC = ROOT / "docs" / "metrics.md"

METRIC_RE = re.compile(r"codistill_[a-z_]+")
RECORDED_RE = re.compile(r"codistill:[a-z0-9_:]+")
# Series a histogram exports besides its documented base name.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
EXPECTED_ALERTS = {
    "CodistillRankLatencyP99OverBudget",
    "CodistillDriftDetected",
    "CodistillTrainerDriftDetected",
    "CodistillTrainerLagGrowing",
    "CodistillGateRejections",
    "CodistillFallbackRateHigh",
    "CodistillStoreOutage",
    "CodistillBrokerOutage",
    "CodistillServerNotReady",
    "CodistillTargetDown",
}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH; run `bash scripts/install_system.sh prometheus` first"
        )
    proc = subprocess.run([path, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    print(proc.stdout)
    print(proc.stderr)
    return proc


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _documented_metrics() -> set[str]:
    """Names in docs/metrics.md, with the table shorthand expanded: a row such as
    `codistill_trainer_store_outages_total`, `_store_retries_total` means
    codistill_trainer_store_retries_total, and `..._misses_total` after
    `codistill_serving_vector_cache_hits_total` means ..._cache_misses_total."""
    text = METRICS_DOC.read_text()
    names = set(METRIC_RE.findall(text))
    for line in text.splitlines():
        if not line.startswith("| `codistill_"):
            continue
        cell = line.split("|")[1]
        tokens = re.findall(r"`([^`]+)`", cell)
        first = tokens[0]
        component = "_".join(first.split("_")[:2])  # codistill_<component>
        for token in tokens[1:]:
            if token.startswith("..._"):
                # replace the last word before _total
                stem = first.removesuffix("_total").rsplit("_", 1)[0]
                names.add(stem + token[3:])
            elif token.startswith("_"):
                names.add(component + token)
    return names


def _rule_text(rule: dict[str, Any]) -> str:
    # Annotations count too: a runbook hint naming a wrong metric misleads on-call.
    return "\n".join([rule["expr"], *rule.get("annotations", {}).values()])


# ---------------------------------------------------------------- promtool
def test_promtool_check_rules() -> None:
    proc = _promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_config() -> None:
    # Also loads rule_files, so the relative glob must resolve to the rules file.
    proc = _promtool("check", "config", str(CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rules/codistill.yml" in proc.stdout, "check config did not load the rules file"


def test_promtool_rule_unit_tests() -> None:
    proc = _promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


# ---------------------------------------------------------------- the rules' content
def test_rules_only_name_documented_metrics() -> None:
    documented = _documented_metrics()
    undocumented: dict[str, set[str]] = {}
    for rule in _rules():
        name = rule.get("record") or rule["alert"]
        for metric in METRIC_RE.findall(_rule_text(rule)):
            base = metric
            for suffix in HISTOGRAM_SUFFIXES:
                if metric.endswith(suffix) and metric.removesuffix(suffix) in documented:
                    base = metric.removesuffix(suffix)
            if base not in documented:
                undocumented.setdefault(name, set()).add(metric)
    assert not undocumented, f"metrics not in docs/metrics.md: {undocumented}"


def test_recorded_names_used_are_recorded() -> None:
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    assert all(name.count(":") == 2 for name in recorded), recorded  # level:metric:ops
    unknown = {
        alert["alert"]: used - recorded
        for alert in _alerts()
        if (used := set(RECORDED_RE.findall(_rule_text(alert)))) - recorded
    }
    assert not unknown, f"alerts use series no rule records: {unknown}"


def test_every_alert_is_actionable() -> None:
    alerts = _alerts()
    assert {a["alert"] for a in alerts} == EXPECTED_ALERTS
    for alert in alerts:
        assert "for" in alert, alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        annotations = alert["annotations"]
        assert annotations.get("summary"), alert["alert"]
        assert "Runbook:" in annotations.get("description", ""), alert["alert"]
        # the description names the series to look at
        assert re.search(r"codistill_|codistill:|up\{", annotations["description"]), alert["alert"]


def test_latency_alert_uses_the_probe_budget() -> None:
    (alert,) = [a for a in _alerts() if a["alert"] == "CodistillRankLatencyP99OverBudget"]
    # the budget is serving.probe_budget_ms (default 50 ms), written in seconds
    budget_s = ServingSettings().probe_budget_ms / 1000
    assert alert["expr"].strip() == f"codistill:rank_latency_seconds:p99 > {budget_s:.3f}"


def test_every_alert_has_firing_and_silent_unit_tests() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    assert doc["rule_files"] == ["../rules/codistill.yml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in (c for test in doc["tests"] for c in test.get("alert_rule_test", [])):
        (fires if case["exp_alerts"] else silent).add(case["alertname"])
        for exp in case["exp_alerts"]:
            # exact labels and annotations, not just "something fired"
            assert exp["exp_labels"].get("severity"), case
            assert set(exp["exp_annotations"]) == {"summary", "description"}, case
    assert fires == EXPECTED_ALERTS, f"no firing case for {EXPECTED_ALERTS - fires}"
    assert silent == EXPECTED_ALERTS, f"no silent case for {EXPECTED_ALERTS - silent}"
    exprs = [c["expr"] for test in doc["tests"] for c in test.get("promql_expr_test", [])]
    assert len({m for e in exprs for m in RECORDED_RE.findall(e)}) >= 3


# ---------------------------------------------------------------- scrape config
def test_config_scrapes_every_component_and_loads_the_rules() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    # relative to the config file: works in the repo and at /etc/prometheus in compose
    assert config["rule_files"] == ["rules/*.yml"]
    assert sorted(CONFIG.parent.glob(config["rule_files"][0])) == [RULES]
    jobs = {
        job["job_name"]: (
            job.get("metrics_path", "/metrics"),
            [t for sc in job["static_configs"] for t in sc["targets"]],
        )
        for job in config["scrape_configs"]
    }
    assert jobs == {
        "prometheus": ("/metrics", ["localhost:9090"]),
        "codistill-server": ("/metrics", ["server:8000"]),
        "codistill-trainer": ("/metrics", ["trainer:9100"]),
        "codistill-watcher": ("/metrics", ["watcher:9101"]),
        "codistill-labeller": ("/metrics", ["labeller:9102"]),
    }
    # CodistillTargetDown selects the app jobs by this prefix
    target_down = next(a for a in _alerts() if a["alert"] == "CodistillTargetDown")
    pattern = re.search(r'job=~"([^"]+)"', target_down["expr"]).group(1)
    assert {j for j in jobs if re.fullmatch(pattern, j)} == set(jobs) - {"prometheus"}
