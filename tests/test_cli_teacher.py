"""The teacher commands on user-supplied ranking files (ids filled by hashing, bad files rejected)."""

import json
from pathlib import Path

from typer.testing import CliRunner

from codistill.app.cli import app
from tests.helpers.code_examples import examples

runner = CliRunner()


def _user_file(path: Path) -> Path:
    rows = [{"query": ex.query, "candidates": ex.candidates, "labels": ex.labels} for ex in examples()]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_evaluate_and_precompute_a_user_file(tmp_path: Path) -> None:
    data = _user_file(tmp_path / "mine.jsonl")
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["--home", str(tmp_path / "h"), "-q", "teacher", "evaluate",
                              "--data", str(data), "--json-out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["results"][str(data)]["n_queries"] == 6
    assert result["results"][str(data)]["mrr@10"] >= 0.9
    res = runner.invoke(app, ["--home", str(tmp_path / "h"), "-q", "teacher", "precompute", "--data", str(data)])
    assert res.exit_code == 0, res.output
    assert "6/6 queries written" in res.output
    res = runner.invoke(app, ["--home", str(tmp_path / "h"), "store", "info"])
    assert res.exit_code == 0 and "complete" in res.output


def test_precompute_appends_a_new_file_to_the_current_version(tmp_path: Path) -> None:
    """The current version is complete; a new user file adds what it lacks to it."""
    from codistill.ranking import read_ranking_file
    from stores.embedded import EmbeddedStore

    home = ["--home", str(tmp_path / "h"), "-q"]
    first = _user_file(tmp_path / "mine.jsonl")
    assert runner.invoke(app, [*home, "teacher", "precompute", "--data", str(first)]).exit_code == 0
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    extra = {"query": "reverse a list in place",
             "candidates": ["def flip(xs):\n    xs.reverse()\n    return xs", *rows[0]["candidates"]],
             "labels": [1] + [0] * len(rows[0]["candidates"])}
    second = tmp_path / "more.jsonl"
    second.write_text(json.dumps(extra) + "\n")
    res = runner.invoke(app, [*home, "teacher", "precompute", "--data", str(second)])
    assert res.exit_code == 0, res.output
    assert "1/1 queries written" in res.output
    ex = read_ranking_file(second)[0]
    with EmbeddedStore(tmp_path / "h" / "store") as store:
        version = store.current()
        assert version is not None and store.get_version(version).status == "complete"
        assert store.has_embeddings(version, ex.candidate_ids).all()
        assert store.get_labels(version, [ex.query_id])[0] is not None
        assert store.get_version(version).sequence == 2  # one new candidate, one new label


def test_malformed_file_names_line_and_field_and_writes_nothing(tmp_path: Path) -> None:
    data = _user_file(tmp_path / "bad.jsonl")
    lines = data.read_text().splitlines()
    lines[3] = json.dumps({"query": "x", "candidates": ["a", "b"], "labels": [1]})
    data.write_text("\n".join(lines) + "\n")
    home = tmp_path / "h"
    res = runner.invoke(app, ["--home", str(home), "teacher", "precompute", "--data", str(data)])
    assert res.exit_code == 2  # a user error: one line naming the input, no traceback
    assert "bad.jsonl:4: field 'labels'" in res.output
    assert not (home / "store").exists()


def test_store_pin_and_unpin_commands(tmp_path: Path) -> None:
    from stores.base import VersionInfo
    from stores.embedded import EmbeddedStore

    with EmbeddedStore(tmp_path / "h" / "store") as store:
        store.begin_version(VersionInfo(teacher_version="v1", model="m", logit_scale=20.0, dim=4))
    home = ["--home", str(tmp_path / "h"), "store"]
    res = runner.invoke(app, [*home, "pin", "v1", "me"])
    assert res.exit_code == 0 and "pinned v1 for me" in res.output, res.output
    with EmbeddedStore(tmp_path / "h" / "store") as store:
        assert store.pins("v1") == {"me"}
    res = runner.invoke(app, [*home, "unpin", "v1", "me"])
    assert res.exit_code == 0 and "unpinned v1 for me" in res.output, res.output
    with EmbeddedStore(tmp_path / "h" / "store") as store:
        assert store.pins("v1") == set()


def test_store_pins_lists_pins_and_leases_with_age(tmp_path: Path) -> None:
    from stores.base import VersionInfo
    from stores.embedded import EmbeddedStore

    with EmbeddedStore(tmp_path / "h" / "store") as store:
        store.begin_version(VersionInfo(teacher_version="v1", model="m", logit_scale=20.0, dim=4))
        store.pin("v1", "student:abc")
        store.lease("v1", "trainer:default", ttl_s=120)
    res = runner.invoke(app, ["--home", str(tmp_path / "h"), "store", "pins"])
    assert res.exit_code == 0, res.output
    assert "student:abc" in res.output and "trainer:default" in res.output
    assert "durable" in res.output and "lease" in res.output and "expires in" in res.output
