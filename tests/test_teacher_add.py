"""Bring your own teacher: a local sentence-transformers folder, hashed and verified like
the shipped ones, usable by name in every teacher command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from codistill.app.cli import app
from teacher import registry
from tests.helpers.code_examples import examples

runner = CliRunner()


def test_a_local_teacher_registers_verifies_and_evaluates(tmp_path: Path) -> None:
    folder = tmp_path / "my_lm"
    shutil.copytree(registry.locate("minilm"), folder)  # a real ST folder, as a user has one
    home = ["--home", str(tmp_path / "h")]
    res = runner.invoke(app, [*home, "teacher", "add", str(folder), "--name", "my_lm"])
    assert res.exit_code == 0, res.output
    lock = json.loads((tmp_path / "h" / "teachers" / registry.LOCAL_LOCK).read_text())
    entry = lock["teachers"]["my_lm"]
    assert entry["kind"] == "local" and "model.safetensors" in entry["files"]
    assert entry["files"]["model.safetensors"] == registry.weights_digest("minilm")
    assert runner.invoke(app, [*home, "teacher", "verify", "my_lm"]).exit_code == 0

    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"query": ex.query, "candidates": ex.candidates,
                                        "labels": ex.labels}) + "\n" for ex in examples()))
    out = tmp_path / "m.json"
    res = runner.invoke(app, [*home, "-q", "teacher", "evaluate", "--teacher", "my_lm",
                              "--data", str(data), "--json-out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["teacher_version"].startswith("my_lm-zs-")
    assert result["results"][str(data)]["mrr@10"] >= 0.9  # the same weights as MiniLM

    with open(folder / "config.json", "a") as fh:  # the folder changes behind our back
        fh.write(" ")
    res = runner.invoke(app, [*home, "teacher", "verify", "my_lm"])
    assert res.exit_code == 2 and "config.json" in res.output


def test_bad_folders_and_names_are_refused(tmp_path: Path) -> None:
    home = ["--home", str(tmp_path / "h")]
    res = runner.invoke(app, [*home, "teacher", "add", str(tmp_path)])
    assert res.exit_code == 2 and "modules.json" in res.output
    folder = tmp_path / "x"
    shutil.copytree(registry.locate("minilm"), folder)
    res = runner.invoke(app, [*home, "teacher", "add", str(folder), "--name", "minilm"])
    assert res.exit_code == 2 and "shipped" in res.output
    res = runner.invoke(app, [*home, "teacher", "add", str(folder), "--name", "a:b"])
    assert res.exit_code == 2 and "letters" in res.output
