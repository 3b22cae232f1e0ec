"""The bundle watcher on a real home and a real server: promote, reject, restart, outage."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from codistill import console as cli
from codistill.app.export import export_bundle
from codistill.config import DistillConfig, Settings
from codistill.gate import GateConfig, decide
from serving.app import Server
from serving.bundle import BundleRegistry
from serving.commands import build_server
from serving.watcher import Watcher, judge_bundle, rejection_reason, watch_command
from stores import open_configured_store
from tasks import dataset as ds
from tests.helpers.redis_process import free_port
from tests.helpers.serving import close_server, serve_in_thread

KEY = "watcher-admin-key"
# The small home has 12 valid lists: a tolerance of 0.01 MRR is below their noise (the
# int8 export of the serving student has effect +0.007 but a lower bound near -0.014).
GATE = GateConfig(mode="non-inferiority", tolerance=0.05, resamples=2000)
REJECTIONS = "codistill_watcher_gate_rejections_total"


def _settings(template: Settings, home: Path) -> Settings:
    return template.model_copy(update={"home": home, "serving": template.serving.model_copy(
        update={"admin_api_key": KEY, "emit_events": False})})


def _untrained_student(s: Settings, store: Any, like: str) -> str:
    """An ``asym-bow`` with random weights and no training, saved like a real one."""
    from student.asym import StoreCandidates
    from student.build import build_student
    from student.registry import StudentCard, student_registry

    reg = student_registry(s.home)
    teacher = reg.load_card(like).teacher_version
    model = build_student(ds.read_split(s, "train"), teacher,
                          DistillConfig(init="random", student="asym-bow"), teacher_dim=384,
                          candidate_source=StoreCandidates(store, teacher))
    card = reg.save(model, StudentCard(kind=model.kind, teacher_version=teacher,
                                       weights_sha256=""))
    return card.student_version


@pytest.fixture(scope="module")
def base(serving_env, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the serving home (no bundles of other modules) with three bundles, in
    this order: the fp32 asym-bow (serving), its int8 export from a "trainer" (good) and
    an untrained asym-bow (bad)."""
    s0, students = serving_env
    home = tmp_path_factory.mktemp("watch-base") / "home"
    top = {"bundles", "events", "serving"}
    shutil.copytree(s0.home, home, ignore=lambda d, names: [
        n for n in names if Path(d) == s0.home and n in top])
    s = _settings(s0, home)
    store = open_configured_store(s)
    try:
        asym = students["asym-bow"]
        serving = export_bundle(s, store, asym).bundle_version
        good = export_bundle(s, store, asym, precision="int8",
                             source={"student_version": asym, "trainer": "test"}).bundle_version
        bad = export_bundle(s, store, _untrained_student(s, store, asym)).bundle_version
    finally:
        store.close()
    return {"home": home, "template": s0, "serving": serving, "good": good, "bad": bad}


@pytest.fixture()
def home(base, tmp_path: Path) -> Settings:
    """A private copy of the base home per test, the fp32 bundle serving."""
    shutil.copytree(base["home"], tmp_path / "home")
    s = _settings(base["template"], tmp_path / "home")
    BundleRegistry(s.bundles_dir).set_serving(base["serving"])
    return s


@pytest.fixture()
def store(home: Settings) -> Iterator[Any]:
    st = open_configured_store(home)
    yield st
    st.close()


def _drop(s: Settings, version: str) -> None:
    shutil.rmtree(BundleRegistry(s.bundles_dir).path(version))


@contextlib.contextmanager
def running_server(s: Settings, port: int | None = None) -> Iterator[tuple[Server, str]]:
    """``codistill serve`` in a thread: the registry's serving bundle, admin API on."""
    srv = build_server(s)
    try:
        with serve_in_thread(srv, port) as url:
            yield srv, url
    finally:
        close_server(srv)


def _served_by(s: Settings, url: str) -> str:
    ex = ds.read_split(s, "valid")[0]
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    conn.request("POST", "/v1/rank", json.dumps(
        {"query": ex.query, "candidates": [{"id": i} for i in ex.candidate_ids]}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return str(json.loads(resp.read())["model_version"])


def _decisions(s: Settings) -> list[dict[str, Any]]:
    path = s.home / "serving" / "gate-decisions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _sample(w: Watcher, name: str, **labels: str) -> float:
    return w.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_good_bundle_passes_the_gate_and_is_promoted(base, home, store) -> None:
    _drop(home, base["bad"])
    with running_server(home) as (srv, url):
        assert _served_by(home, url) == base["serving"]
        w = Watcher(home, store, url, KEY, gate=GATE)
        result = w.run_once()
        assert result.error is None and result.rejected == {}
        assert result.promoted == [base["good"]] and result.serving == base["good"]
        assert srv.host.serving.version == base["good"] == _served_by(home, url)
    assert BundleRegistry(home.bundles_dir).pointer().serving == base["good"]
    [entry] = _decisions(home)
    assert entry["outcome"] == "promoted" and entry["incumbent"] == base["serving"]
    assert not entry["teacher_mismatch"] and entry["decision"]["promote"]
    assert entry["decision"]["mode"] == "non-inferiority"
    assert [r["name"] for r in entry["decision"]["sets"]] == ["valid", *ds.built_guards(home)]
    assert _sample(w, "codistill_watcher_promotions_total") == 1
    assert _sample(w, "codistill_watcher_judged_total") == 1
    assert _sample(w, "codistill_watcher_last_decision_timestamp_seconds") > time.time() - 60


def test_a_bad_bundle_is_rejected_and_serving_is_untouched(base, home, store) -> None:
    _drop(home, base["good"])
    with running_server(home) as (srv, url):
        w = Watcher(home, store, url, KEY, gate=GATE)
        metrics = w.serve_metrics(free_port())
        try:
            result = w.run_once()
            port = metrics.server_address[1]
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        finally:
            metrics.shutdown()
        assert result.rejected == {base["bad"]: "valid"} and result.promoted == []
        assert srv.host.slots() == {"serving": base["serving"], "candidate": None,
                                    "previous": None}
        assert _served_by(home, url) == base["serving"]
    assert BundleRegistry(home.bundles_dir).pointer().serving == base["serving"]
    assert _sample(w, REJECTIONS, reason="valid") == 1
    assert _sample(w, "codistill_watcher_promotions_total") == 0
    assert f'{REJECTIONS}{{reason="valid"}} 1.0'.encode() in text
    [entry] = _decisions(home)
    valid = entry["decision"]["sets"][0]
    assert entry["outcome"] == "rejected" and entry["reason"] == "valid"
    assert valid["name"] == "valid" and valid["effect"] < 0 and not valid["passed"]


def test_a_restarted_watcher_does_not_judge_again(base, home, store) -> None:
    with running_server(home) as (_srv, url):
        first = Watcher(home, store, url, KEY, gate=GATE).run_once()
        assert first.promoted == [base["good"]]
        assert first.rejected == {base["bad"]: "valid"}  # judged against the new serving one
        again = Watcher(home, store, url, KEY, gate=GATE)
        assert set(again.judged) == {base["good"], base["bad"]}
        second = again.run_once()
    assert second.error is None and second.serving == base["good"]
    assert second.judged == second.promoted == [] and second.rejected == {}
    assert _sample(again, "codistill_watcher_judged_total") == 0
    assert [e["candidate"] for e in _decisions(home)] == [base["good"], base["bad"]]


def test_a_server_that_is_down_is_retried_at_the_next_poll(base, home, store) -> None:
    _drop(home, base["bad"])
    port = free_port()
    w = Watcher(home, store, f"http://127.0.0.1:{port}", KEY, gate=GATE, http_timeout_s=5)
    down = w.run_once()
    assert down.error is not None and down.error.startswith("server:")
    assert down.promoted == down.judged == [] and w.judged == {}
    assert _sample(w, "codistill_watcher_poll_errors_total", kind="server") == 1
    with running_server(home, port) as (srv, _url):
        up = w.run_once()
        assert up.error is None and up.promoted == [base["good"]]
        assert srv.host.serving.version == base["good"]


def test_trainer_only_considers_bundles_a_trainer_exported(base, home, store) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert Watcher(home, store, url, KEY).candidates(base["serving"]) == [base["good"],
                                                                          base["bad"]]
    assert Watcher(home, store, url, KEY, trainer_only=True).candidates(base["serving"]) == [
        base["good"]]
    assert Watcher(home, store, url, KEY).candidates(base["bad"]) == []  # nothing newer


def test_judge_bundle_scores_both_bundles_as_served(base, home, store) -> None:
    same = judge_bundle(home, store, base["serving"], base["serving"], GATE)
    assert same.promote and all(r.effect == 0 for r in same.sets)
    worse = judge_bundle(home, store, base["bad"], base["serving"], GATE)
    assert not worse.promote and rejection_reason(worse) == "valid"


def test_rejection_reasons_name_the_first_failed_set() -> None:
    old = np.ones(50)
    d = decide({"valid": (old, old), "prose": (old * 0, old)}, GATE)
    assert not d.promote and rejection_reason(d) == "guard:prose"


def test_watch_command_once_fails_cleanly_when_the_server_is_down(home, monkeypatch) -> None:
    app = typer.Typer()
    app.command()(watch_command)
    monkeypatch.setitem(cli._STATE, "home", home.home)
    monkeypatch.setitem(cli._STATE, "config", None)  # no root callback ran: no stale --config
    env = {"CODISTILL_DATA__SIZE": home.data.size,
           "CODISTILL_TEACHER__MAX_SEQ_LENGTH": str(home.teacher.max_seq_length),
           "CODISTILL_SERVING__ADMIN_API_KEY": KEY}
    result = CliRunner().invoke(app, ["--once", "--server-url",
                                      f"http://127.0.0.1:{free_port()}"], env=env)
    assert result.exit_code == 2, result.output
    assert "server:" in result.output
    no_key = CliRunner().invoke(app, ["--once"], env={**env,
                                                      "CODISTILL_SERVING__ADMIN_API_KEY": ""})
    assert no_key.exit_code == 2 and "admin_api_key" in no_key.output


def test_watch_command_finds_the_server_through_the_watcher_section(home, monkeypatch) -> None:
    """``watcher.server_url`` (how a container names the server) is where it polls."""
    app = typer.Typer()
    app.command()(watch_command)
    monkeypatch.setitem(cli._STATE, "home", home.home)
    monkeypatch.setitem(cli._STATE, "config", None)
    with running_server(home) as (srv, url):
        env = {"CODISTILL_DATA__SIZE": home.data.size,
               "CODISTILL_TEACHER__MAX_SEQ_LENGTH": str(home.teacher.max_seq_length),
               "CODISTILL_SERVING__ADMIN_API_KEY": KEY,
               "CODISTILL_SERVING__PORT": str(free_port()),  # nothing listens there
               "CODISTILL_WATCHER__SERVER_URL": url}
        result = CliRunner().invoke(app, ["--once"], env=env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["serving"] == srv.host.serving.version
