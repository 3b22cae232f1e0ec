"""Configuration precedence and the CLI surface."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from codistill.cli import app
from codistill.config import load_settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CODISTILL_CONFIG", "CODISTILL_STORE__BACKEND", "CODISTILL_DATA__SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_run_on_embedded_backends() -> None:
    s = load_settings()
    assert s.store.backend == "embedded" and s.stream.backend == "embedded"
    assert s.resolved_store().path == s.home / "store"


def test_file_then_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("store:\n  backend: redis\n  namespace: fromfile\ndata:\n  size: small\n")
    monkeypatch.setenv("CODISTILL_DATA__SIZE", "full")
    s = load_settings(cfg)
    assert s.store.backend == "redis" and s.store.namespace == "fromfile"
    assert s.data.size == "full"  # environment beats the file
    toml = tmp_path / "c.toml"
    toml.write_text('[teacher]\nlogit_scale = 10.0\n')
    assert load_settings(toml).teacher.logit_scale == 10.0


def test_cli_lists_subcommands_and_shows_config(tmp_path: Path) -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("config", "data", "teacher", "store", "demo"):
        assert cmd in res.output
    res = runner.invoke(app, ["--home", str(tmp_path), "config", "show", "--json"])
    assert res.exit_code == 0, res.output
    assert '"backend": "embedded"' in res.output and str(tmp_path) in res.output


def test_cli_rejects_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("store:\n  backend: cassandra\n")
    res = runner.invoke(app, ["--config", str(cfg), "config", "show"])
    assert res.exit_code == 2
    assert "invalid configuration" in res.output and "backend" in res.output
