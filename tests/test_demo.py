"""The main job end to end at the small size: every stage runs and reports (slow, in CI).

The demo is the README's first command; this runs the same code path through the
``codistill`` CLI on embedded backends (fine-tuning skipped to save CI minutes; the
teacher tests train and promote).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from codistill.app.cli import app

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_writes_its_summary(tmp_path: Path) -> None:
    home = tmp_path / "home"
    res = CliRunner().invoke(app, ["--home", str(home), "-q", "demo", "--size", "small",
                                   "--skip-train"])
    assert res.exit_code == 0, res.output
    summary = json.loads((home / "demo_summary.json").read_text())
    assert list(summary["seconds"]) == [
        "build data", "evaluate zero-shot teacher", "precompute embeddings + soft labels",
        "distill student (offline warm start)", "online training over a seeded event stream"]
    assert summary["data"]["counts"]["test"]["queries"] == 60
    # which teacher, and why, is printed and kept
    assert summary["teacher_choice"].startswith("teacher: minilm zero-shot at 128 tokens")
    assert "Why this teacher" in " ".join(res.output.split())
    distilled = summary["distill"]["results"]
    for split in ("valid", "test"):  # the student learned something on held-out queries
        assert distilled["student"][split]["mrr@10"] > distilled["untrained"][split]["mrr@10"]
    online = summary["online"]
    assert online["trainer"]["batches"] > 0 and online["trainer"]["counters"]["dlq"] > 0
    bad = sum(n for kind, n in online["produced"].items() if kind != "valid")
    assert online["trainer"]["counters"]["dlq"] == bad  # every malformed message, no valid one
    assert 0 < online["test"]["mrr@10"] <= 1
