"""``codistill simulate``: seeded users on in-process rankers and on a real server over HTTP.

In-process the command writes the v2 impressions and click feedback itself (to the
home's embedded log); with ``--ranker server`` the server writes them and the command
sends only ``/v1/rank`` and ``/v1/feedback`` with the click model's propensity.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from codistill import console as cli
from codistill.app.export import export_bundle
from codistill.app.simulate import simulate_command
from codistill.config import Settings
from serving.bundle import BundleRegistry
from serving.commands import build_server
from stores import open_configured_store
from streaming import Feedback, Impression, open_stream, parse_event
from streaming.dlq import Rejection, validate
from teacher import workflow as wf
from tests.helpers.online import read_topic
from tests.helpers.serving import close_server, copy_home, serve_in_thread


@pytest.fixture(scope="module")
def home(serving_env, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A copy of the serving home (its store, cache and students; no events, no bundles)."""
    s0, _ = serving_env
    return copy_home(s0, tmp_path_factory.mktemp("simulate") / "home")


def _invoke(home: Path | Settings, args: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    app = typer.Typer()
    app.command()(simulate_command)
    monkeypatch.setitem(cli._STATE, "home", home.home if isinstance(home, Settings) else home)
    return CliRunner().invoke(app, args, env={"CODISTILL_DATA__SIZE": "small",
                                              "CODISTILL_TEACHER__MAX_SEQ_LENGTH": "64"})


def _summary(result: Any) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _events(s: Settings, prefix: str = "") -> list[Impression | Feedback]:
    stream = open_stream(s.resolved_stream())
    try:
        return [e for r in read_topic(stream, s.stream.topic)
                if (e := parse_event(r.value)).request_id.startswith(prefix)]
    finally:
        stream.close()


def _split(events: list[Any]) -> tuple[list[Impression], list[Feedback]]:
    """Impressions and feedback in request id order (the log is read partition by partition)."""
    return (sorted((e for e in events if isinstance(e, Impression)), key=lambda e: e.request_id),
            sorted((e for e in events if isinstance(e, Feedback)),
                   key=lambda e: (e.request_id, e.position)))


def test_teacher_run_writes_its_impressions_and_clicks_with_the_models_propensities(
        home: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = _summary(_invoke(home, ["--ranker", "teacher", "--impressions", "50", "--seed",
                                      "3", "--click-model", "pbm", "--switch-after", "20"],
                               monkeypatch))
    imps, fbs = _split(_events(home, summary["request_prefix"] + "-"))
    teacher = wf.ensure_current(home)
    assert len(imps) == 50 == summary["impressions"] and fbs and len(fbs) == summary["clicks"]
    assert len({i.request_id for i in imps}) == 50
    assert all(i.schema_version == 2 and i.model_version == teacher for i in imps)
    assert summary["model_version"] == teacher and summary["errors"] == 0
    assert summary["events_written"] == 50 + len(fbs) and summary["events_per_s"] > 0
    shown = {i.request_id: i for i in imps}
    for f in fbs:  # pbm: the examination of rank r is 1 / r, logged with the click
        imp = shown[f.request_id]
        assert f.schema_version == 2 and f.action == "click"
        assert imp.candidate_ids[f.position - 1] == f.candidate_id
        assert f.propensity == pytest.approx(1 / f.position)
        assert f.event_time > imp.event_time
        assert f.unknown_candidate == (f.candidate_id in imp.unknown_candidate_ids)
    positions = Counter(str(f.position) for f in fbs)
    assert summary["clicks_per_position"] == dict(sorted(positions.items(), key=lambda kv: int(kv[0])))
    assert summary["mean_propensity"] == pytest.approx(sum(1 / f.position for f in fbs) / len(fbs))
    assert 0 < summary["first_seen_share"] <= 1
    # the online split is not in the store: declared unknown, texts stored, so the
    # trainer's candidate check (streaming.dlq, as its reader calls it) lets them through
    unknown = sorted({c for i in imps for c in i.unknown_candidate_ids})
    with open_configured_store(home) as store:
        assert unknown and None not in store.get_texts(unknown)
        assert not store.has_embeddings(teacher, unknown).any()
        stream = open_stream(home.resolved_stream())
        try:
            records = [r for r in read_topic(stream, home.stream.topic)
                       if parse_event(r.value).request_id in shown]
        finally:
            stream.close()

        def known(ids: list[str]) -> list[bool]:
            return list(store.has_embeddings(teacher, ids))

        assert len(records) == 50 + len(fbs)
        assert all(r.key == parse_event(r.value).request_id for r in records)  # as the server
        assert not [r for r in records if isinstance(validate(r, known), Rejection)]


def test_same_seed_same_users_and_propensity_swap_changes_only_what_is_logged(
        home: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--ranker", "bm25", "--impressions", "40", "--seed", "5", "--click-model",
            "navigational"]
    runs = [_summary(_invoke(home, args + extra, monkeypatch))
            for extra in ([], [], ["--propensity", "swap"])]
    shown, clicks = [], []
    for run in runs:
        imps, fbs = _split(_events(home, run["request_prefix"] + "-"))
        assert len(imps) == 40 and all(i.model_version == "bm25" for i in imps)
        shown.append([(i.query_id, i.candidate_ids) for i in imps])
        clicks.append([(f.request_id.rsplit("-", 1)[1], f.position, f.candidate_id)
                       for f in fbs])
        assert all(0 < f.propensity <= 1 for f in fbs)
        assert all(f.propensity == 1.0 for f in fbs if f.position == 1)  # always examined
    # a cascade's exact examination depends on the list above; the swap estimate does not
    swap: dict[int, float | None] = {}
    for f in _split(_events(home, runs[2]["request_prefix"] + "-"))[1]:
        assert swap.setdefault(f.position, f.propensity) == f.propensity
    assert runs[0]["request_prefix"] != runs[1]["request_prefix"]  # runs never share an id
    assert shown[0] == shown[1] == shown[2] and clicks[0] == clicks[1] == clicks[2] != []
    assert runs[0]["clicks_per_position"] == runs[1]["clicks_per_position"] == \
        runs[2]["clicks_per_position"]
    assert runs[0]["mean_propensity"] == runs[1]["mean_propensity"]
    assert runs[2]["mean_propensity"] != runs[0]["mean_propensity"]  # swap estimates differ


@pytest.fixture(scope="module")
def server(home: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``codistill serve`` of the asym-bow student in a thread, with its own event log."""
    s = home.model_copy(update={"stream": home.stream.model_copy(
        update={"path": tmp_path_factory.mktemp("server-events")})})
    with open_configured_store(s) as store:
        version = export_bundle(s, store).bundle_version
    BundleRegistry(s.bundles_dir).set_serving(version)
    srv = build_server(s)
    try:
        with serve_in_thread(srv) as url:
            yield {"url": url, "server": srv, "settings": s, "bundle": version}
    finally:
        close_server(srv)


def test_server_ranker_sends_ranks_and_clicks_and_the_server_logs_them(
        home: Settings, server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    before = len(_events(home))
    summary = _summary(_invoke(home, ["--ranker", "server", "--server-url", server["url"],
                                      "--impressions", "20", "--seed", "2", "--rate", "100"],
                               monkeypatch))
    assert server["server"].sink.flush()
    imps, fbs = _split(_events(server["settings"]))
    assert len(imps) == 20 == summary["impressions"] and summary["errors"] == 0
    assert all(i.model_version == server["bundle"] == summary["model_version"] for i in imps)
    ids = {i.request_id for i in imps}  # the server's request ids (uuid hex), not the simulator's
    assert len(ids) == 20 and not any(r.startswith(("sim-", "unused-")) for r in ids)
    assert fbs and len(fbs) == summary["clicks"] and {f.request_id for f in fbs} <= ids
    assert all(f.propensity == pytest.approx(1 / f.position) for f in fbs)
    assert summary["events_written"] == 20 + len(fbs)
    assert summary["seconds"] >= 19 / 100  # paced: visit i waits for start + i / rate
    assert len(_events(home)) == before  # the simulator itself wrote nothing


def test_bad_input_and_unprepared_homes_exit_2_with_the_fix(
        home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _invoke(home, ["--ranker", "nope"], monkeypatch)
    assert bad.exit_code == 2 and "unknown ranker 'nope'" in bad.output
    assert "teacher, student, bm25, server" in bad.output
    bad = _invoke(home, ["--ranker", "teacher", "--rate", "5"], monkeypatch)
    assert bad.exit_code == 2 and "--ranker server only" in bad.output
    bad = _invoke(home, ["--ranker", "bm25", "--strength", "0.9"], monkeypatch)
    assert bad.exit_code == 2 and "strength must be in [0, 0.5]" in bad.output
    empty = _invoke(tmp_path / "empty", ["--ranker", "teacher"], monkeypatch)
    assert empty.exit_code == 2 and "codistill stack prepare" in empty.output
    assert "no online split" in empty.output
    data_only = tmp_path / "data-only"
    shutil.copytree(home.data_dir, data_only / "data" / "small")
    no_student = _invoke(data_only, ["--ranker", "student"], monkeypatch)
    assert no_student.exit_code == 2 and "no current student" in no_student.output
    assert "codistill experiment online" in no_student.output
