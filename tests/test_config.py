"""Configuration precedence and the CLI surface."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from codistill.app.cli import app
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


def test_distill_and_online_are_settings_sections(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """File and environment reach the student recipes like every other section."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("distill:\n  epochs: 3\n  student: bow\nonline:\n  lr: 0.0001\n")
    monkeypatch.setenv("CODISTILL_ONLINE__BATCH_SIZE", "16")
    s = load_settings(cfg)
    assert (s.distill.epochs, s.distill.student, s.online.lr) == (3, "bow", 1e-4)
    assert s.online.batch_size == 16 and s.online.checkpoint_every == 10
    res = runner.invoke(app, ["--config", str(cfg), "config", "show", "--json"])
    assert res.exit_code == 0, res.output
    assert '"epochs": 3' in res.output and '"batch_size": 16' in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("online:\n  alpha: 2.0\n")
    res = runner.invoke(app, ["--config", str(bad), "config", "show"])
    assert res.exit_code == 2 and "alpha" in res.output


def test_cli_flags_override_the_sections() -> None:
    """A flag given on the command line wins; a flag left out keeps the section's value."""
    from student.commands import _with_flags

    s = load_settings(distill={"epochs": 3, "alpha": 0.7})
    cfg = _with_flags(s.distill, epochs=5, alpha=None, temperature=None)
    assert (cfg.epochs, cfg.alpha, cfg.temperature) == (5, 0.7, s.distill.temperature)
    online = _with_flags(s.online, lr=1e-4, name=None)
    assert online.lr == 1e-4 and online.name == "default"


@pytest.mark.parametrize("section, key", [
    ("data", "sizes"), ("teacher", "max_seq_lenght"), ("store", "backnd"), ("stream", "topics"),
    ("distill", "epoch"), ("online", "alpah")])
def test_a_misspelt_key_in_any_section_is_an_error(tmp_path: Path, section: str, key: str) -> None:
    """A typo in a settings file must not be ignored silently (the default would run instead)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(ValueError, match=key):
        load_settings(cfg)


@pytest.mark.parametrize("nested", [{"teacher": {"train": {"lr_rate": 1e-5}}},
                                    {"teacher": {"gate": {"mode_": "superiority"}}}])
def test_a_misspelt_nested_key_is_an_error(nested: dict) -> None:
    with pytest.raises(ValueError, match="_rate|mode_"):
        load_settings(**nested)
