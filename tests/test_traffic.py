"""``codistill traffic`` against a real server over real HTTP, and its click model alone."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from codistill import console as cli
from codistill.app.export import export_bundle
from codistill.app.traffic import (
    TrafficGenerator,
    default_url,
    load_sources,
    simulate_user,
    traffic_command,
)
from codistill.config import Settings
from serving.bundle import BundleRegistry
from serving.commands import build_server
from stores import open_configured_store
from tests.helpers.redis_process import free_port
from tests.helpers.serving import close_server, copy_home, serve_in_thread

FEEDBACK_OK = 'codistill_serving_requests_total{endpoint="/v1/feedback",status="200"}'
RANK_OK = 'codistill_serving_requests_total{endpoint="/v1/rank",status="200"}'


@pytest.fixture(scope="module")
def home(serving_env, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A copy of the serving home (no other module's bundles) serving the asym-bow student."""
    s0, students = serving_env
    s = copy_home(s0, tmp_path_factory.mktemp("traffic") / "home")
    s = s.model_copy(update={"serving": s.serving.model_copy(update={"emit_events": False})})
    with open_configured_store(s) as store:
        version = export_bundle(s, store, students["asym-bow"]).bundle_version
    BundleRegistry(s.bundles_dir).set_serving(version)
    return s


@pytest.fixture(scope="module")
def url(home: Settings) -> Iterator[str]:
    """``codistill serve`` in a thread on a free loopback port."""
    srv = build_server(home)
    try:
        with serve_in_thread(srv) as address:
            yield address
    finally:
        close_server(srv)


def _metric(url: str, series: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    match = re.search(re.escape(series) + r" (\S+)", text)
    return float(match.group(1)) if match else 0.0


def _config(s: Settings, **update: Any) -> Settings:
    return s.model_copy(update={"traffic": s.traffic.model_copy(update=update)})


def test_traffic_ranks_clicks_and_switches_sources(home: Settings, url: str) -> None:
    s = _config(home, rate=200.0, requests=40, switch_after=15, accept_share=0.5,
                sources=["valid", "guard:nl2code-prose"])
    before = _metric(url, FEEDBACK_OK), _metric(url, RANK_OK)
    t0 = time.monotonic()
    summary = TrafficGenerator(s, url).run()
    took = time.monotonic() - t0
    assert (summary.sent, summary.ok, summary.errors, summary.rejected) == (40, 40, 0, 0)
    assert summary.per_source == {"valid": {"sent": 15, "ok": 15},
                                  "guard:nl2code-prose": {"sent": 25, "ok": 25}}
    assert summary.clicks > 0 and summary.accepts > 0 and summary.started <= summary.ended
    after = _metric(url, FEEDBACK_OK), _metric(url, RANK_OK)
    assert after[0] - before[0] == summary.clicks + summary.accepts > 0  # server counted it
    assert after[1] - before[1] == 40
    assert took >= 39 / 200  # paced: tick i waits for start + i / rate
    assert json.loads(summary.to_json())["per_source"]["valid"]["sent"] == 15


def test_same_seed_sends_the_same_traffic(home: Settings, url: str) -> None:
    s = _config(home, rate=500.0, requests=12, sources=["valid"], click_eta=0.5)
    sent: list[list[Any]] = []
    for _ in range(2):
        calls: list[Any] = []
        gen = TrafficGenerator(s, url)
        real = gen.client.call

        def spy(method: str, u: str, body: Any = None, calls: list[Any] = calls,
                real: Any = real) -> Any:
            calls.append((u.removeprefix(url), body and (body.get("query"), body.get("action"))))
            return real(method, u, body)

        gen.client.call = spy  # type: ignore[method-assign]
        gen.run()
        sent.append(calls)
    assert sent[0] == sent[1] and any(path == "/v1/feedback" for path, _ in sent[0])


def test_clicks_are_position_biased() -> None:
    """Over a few hundred users the gold at rank 1 is clicked far more often than at 5."""
    rng = random.Random(0)
    shown = [f"c{i}" for i in range(10)]
    clicks: Counter[int] = Counter()
    accepts = 0
    for _ in range(600):
        gold_rank = rng.randint(1, 10)
        actions = simulate_user(rng, shown, shown[gold_rank - 1], eta=1.0, accept_share=0.3,
                                noise_click=0.0)
        clicks.update(shown.index(c) + 1 for c, a in actions if a == "click")
        accepts += sum(a == "accept" for _, a in actions)
        assert all(c == shown[gold_rank - 1] for c, _ in actions)  # no noise: only the gold
    assert clicks[1] > 2.5 * clicks[5] > 0
    assert 0 < accepts < sum(clicks.values())
    # eta = 0: no position bias, the gold is always examined
    assert simulate_user(random.Random(1), shown, "c7", 0.0, 0.0, 0.0) == [("c7", "click")]
    same = [simulate_user(random.Random(3), shown, "c0", 1.0, 0.5) for _ in range(2)]
    assert same[0] == same[1]


def test_noise_clicks_land_off_the_gold() -> None:
    rng = random.Random(0)
    shown = [f"c{i}" for i in range(10)]
    actions = [a for _ in range(500) for a in simulate_user(rng, shown, "c0", 1.0, 0.0, 0.2)]
    off = [c for c, a in actions if c != "c0"]
    assert off and all(a == "click" for c, a in actions if c != "c0")


def test_sources_resolve_and_unknown_ones_name_the_choices(home: Settings) -> None:
    sources = load_sources(home, ["test", "guard:nl2code-prose"])
    assert [name for name, _ in sources] == ["test", "guard:nl2code-prose"]
    assert all(examples for _, examples in sources)
    with pytest.raises(ValueError, match=r"'nope'.*available guard sets: guard:nl2code-prose"):
        load_sources(home, ["guard:nope"])
    with pytest.raises(ValueError, match="neither a split"):
        load_sources(home, ["dev"])


def test_default_url_maps_a_wildcard_bind_to_loopback(home: Settings) -> None:
    s = home.model_copy(update={"serving": home.serving.model_copy(
        update={"host": "0.0.0.0", "port": 8123})})
    assert default_url(s) == "http://127.0.0.1:8123"
    assert default_url(_config(s, server_url="http://srv:9/")) == "http://srv:9"


def test_a_server_that_is_not_up_is_counted_not_fatal(home: Settings) -> None:
    s = _config(home, rate=200.0, requests=6, sources=["valid"])
    said: list[str] = []
    gen = TrafficGenerator(s, f"http://127.0.0.1:{free_port()}", ready_timeout_s=0.3,
                           echo=said.append)
    summary = gen.run()
    assert (summary.sent, summary.ok, summary.errors, summary.clicks) == (6, 0, 6, 0)
    assert any("not ready after 0.3 s" in m for m in said)


def test_rejections_are_counted_and_their_reason_logged_once(
        home: Settings, url: str, caplog: pytest.LogCaptureFixture) -> None:
    s = _config(home, rate=500.0, requests=5, sources=["valid"])
    gen = TrafficGenerator(s, url)
    gen.sources = [("valid", [ex.model_copy(update={"query": "x" * 100_000})
                              for ex in gen.sources[0][1]])]  # over serving.max_query_chars
    with caplog.at_level("WARNING", logger="codistill.app.traffic"):
        summary = gen.run()
    assert (summary.sent, summary.ok, summary.rejected, summary.errors) == (5, 0, 5, 0)
    logged = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(logged) == 1 and "HTTP 422" in logged[0] and "max_query_chars" in logged[0]


def test_long_lists_keep_the_gold_within_the_servers_limit(home: Settings) -> None:
    s = home.model_copy(update={"serving": home.serving.model_copy(update={"max_candidates": 3})})
    gen = TrafficGenerator(s, "http://127.0.0.1:1", sources=load_sources(s, ["guard:nl2code-prose"]))
    ex = max(gen.sources[0][1], key=lambda e: e.gold_index)
    body = gen._payload(ex)
    ids = [c["id"] for c in body["candidates"]]
    assert len(ids) == 3 and ex.candidate_ids[ex.gold_index] in ids and body["top_k"] == 3
    assert all(c["text"] in ex.candidates for c in body["candidates"])


def _invoke(home: Settings, args: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    app = typer.Typer()
    app.command()(traffic_command)
    monkeypatch.setitem(cli._STATE, "home", home.home)
    return CliRunner().invoke(app, args, env={"CODISTILL_DATA__SIZE": home.data.size})


def test_command_prints_the_start_and_the_summary(home: Settings, url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    result = _invoke(home, ["--server-url", url, "--rate", "200", "--requests", "8",
                            "--sources", "test, valid", "--switch-after", "3"], monkeypatch)
    assert result.exit_code == 0, result.output
    assert f"traffic to {url} from test, valid at 200 requests/s" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["sent"], summary["ok"]) == (8, 8)
    assert summary["per_source"]["test"]["sent"] == 3
    bad = _invoke(home, ["--server-url", url, "--sources", "guard:nope"], monkeypatch)
    assert bad.exit_code == 2 and "available guard sets" in bad.output


def test_sigterm_ends_the_command_with_its_summary(home: Settings, url: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    before = _metric(url, RANK_OK)

    def terminate() -> None:  # once it is sending, so its handler is in place
        deadline = time.monotonic() + 20
        while _metric(url, RANK_OK) < before + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a stray one must not kill pytest
    killer = threading.Thread(target=terminate, daemon=True)
    try:
        killer.start()
        result = _invoke(home, ["--server-url", url, "--rate", "100", "--requests", "2000",
                                "--sources", "valid"], monkeypatch)
        killer.join(20)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert 3 <= summary["sent"] < 2000 and summary["errors"] == 0
