"""``codistill experiment online --quick --stack``: the KD + feedback arm through real
Kafka and Redis, the labeller, the trainer and the server, beside the in-process arms.

A tiny run (the quick settings, the shared small home) checks the wiring, not the
agreement: every impression the users sent was answered and scored, the trainer learned
from them and published bundles that the server then served, the labeller filled the
seed's Redis namespace as it went, and nothing of the run is left behind (processes,
Redis keys, Kafka topics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from codistill.app.cli import app
from codistill.app.experiment.commands import QUICK
from codistill.app.experiment.stack import REFERENCE, STACK_ARM
from tests.helpers.serving import copy_home

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def stacked(serving_env: Any, redis_url: str, kafka_bootstrap: str,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    settings, _ = serving_env
    s = copy_home(settings, tmp_path_factory.mktemp("exp-stack") / "home")
    out = s.home / "quick-stack.json"
    result = CliRunner().invoke(
        app, ["--home", str(s.home), "experiment", "online", "--quick", "--no-prepare",
              "--no-progress", "--stack", "--out", str(out)],
        env={"CODISTILL_DATA__SIZE": s.data.size, "CODISTILL_STORE__REDIS_URL": redis_url,
             "CODISTILL_STREAM__BOOTSTRAP_SERVERS": kafka_bootstrap})
    assert result.exit_code == 0, result.output
    assert "stack arm:" in result.output
    return json.loads(out.read_text()), out


def test_stack_arm_serves_scores_and_learns_every_seed(stacked: Any) -> None:
    result, _ = stacked
    stack = result["stack"]
    assert STACK_ARM in result["config"]["arms"] and STACK_ARM in result["phases"]
    assert stack["errors"] == 0, stack
    assert len(stack["seeds"]) == QUICK["seeds"]
    for seed in stack["seeds"]:
        assert seed["unscored_impressions"] == 0, seed
        assert seed["simulator"]["impressions"] == QUICK["impressions"]
        # the trainer learned from the served impressions and its bundles were served
        assert seed["trainer"]["optimizer_steps"] > 0, seed["trainer"]
        assert seed["bundles_promoted"] >= 1 and seed["bundles_served"] >= 2, seed
        counters = seed["trainer"]["counters"]
        assert counters.get("dlq", 0) == 0 and counters["valid_events"] == counters["events_consumed"]
        # drained before it stopped: it read every event the users caused and joined every
        # impression but the last join window's (no later event closes that window)
        assert counters["events_consumed"] == seed["simulator"]["events_written"], counters
        held = QUICK["impressions"] - counters["impressions_joined"]
        assert 0 <= held <= stack["rate"] * (stack["window_s"] + 1), counters
    for series in result["curves"]["ndcg"]["arms"][STACK_ARM]["mean"]:
        assert 0 <= series <= 1
    agree = stack["agreement"]
    assert set(agree["phases"]) == {"before", "after", "all"} and agree["bins"] > 0
    for name, phase in agree["phases"].items():
        assert phase["in_process"] == result["phases"][REFERENCE][f"ndcg_{name}"]
        assert phase["stack"] == result["phases"][STACK_ARM][f"ndcg_{name}"]


def test_stack_run_leaves_no_keys_or_topics_behind(stacked: Any, redis_url: str,
                                                   kafka_bootstrap: str) -> None:
    from kafka import KafkaAdminClient

    result, _ = stacked
    client = redis.Redis.from_url(redis_url)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        topics = set(admin.list_topics())
        for seed in result["stack"]["seeds"]:
            assert not list(client.scan_iter(f"{seed['tag']}:*", count=1000)), seed["tag"]
            assert f"{seed['tag']}.events" not in topics
    finally:
        admin.close()
        client.close()
