"""A user error is one line and exit code 2; a bug is a traceback; durable files are synced.

* Bad input (a malformed ranking file, a missing split, an unknown version) names the
  input and the fix, exits 2, and prints no traceback.
* A bug (an exception nobody expected) is never relabelled as a user error.
* Every file that must survive a crash (ranking files, the data manifest, checkpoint
  pointers) is written through ``codistill.fsio``: fsynced, renamed, parent synced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from codistill.ranking import RankingExample, write_ranking_file

runner = CliRunner()


def _app():
    from codistill.app.cli import app

    return app


def test_a_user_error_exits_2_with_one_line(tmp_path: Path) -> None:
    res = runner.invoke(_app(), ["--home", str(tmp_path), "teacher", "precompute"])
    assert res.exit_code == 2, res.output
    assert "build the data first" in res.output and "Traceback" not in res.output
    res = runner.invoke(_app(), ["--home", str(tmp_path), "student", "evaluate", "--data",
                                 str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "run `codistill student distill` first" in res.output


def test_a_bug_is_not_relabelled_as_invalid_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import codistill.console

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug in settings loading")

    monkeypatch.setattr(codistill.console, "load_settings", broken)
    res = runner.invoke(_app(), ["--home", str(tmp_path), "config", "show"])
    assert isinstance(res.exception, ZeroDivisionError)  # a traceback, not a user error
    assert "invalid configuration" not in res.output


def _synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every fd handed to ``os.fsync``."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_ranking_files_are_written_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    seen = _synced(monkeypatch)
    path = tmp_path / "out" / "split.jsonl"
    ex = RankingExample(query="q", candidates=["def f():\n    pass"], labels=[1])
    assert write_ranking_file(path, [ex]) == 1
    assert any(Path(s).parent == path.parent and s != str(path.parent) for s in seen)  # the file
    assert str(path.parent) in seen  # and the rename
    assert json.loads(path.read_text())["query"] == "q"


def test_the_data_manifest_is_written_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    from codistill.config import DataSettings
    from tasks.build import MANIFEST, build_dataset
    from tasks.packages import SMALL_STDLIB  # noqa: F401  (the small size mines only these)

    seen = _synced(monkeypatch)
    out = tmp_path / "data"
    build_dataset(DataSettings(size="small"), out, tmp_path / "dl", progress=False)
    assert (out / MANIFEST).exists()
    assert any(s.startswith(str(out / f".{MANIFEST}")) for s in seen)
    assert str(out) in seen
