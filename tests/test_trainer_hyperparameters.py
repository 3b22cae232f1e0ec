"""Resuming a trainer with other hyperparameters: refused, unless accepted as a new segment.

A checkpoint's weights were produced by its hyperparameters; continuing under
other ones silently (or, for the learning rate, silently *not*: the optimizer's
saved state carries the old one) makes a model no run configuration describes.
So a resume compares the configuration with the checkpoint's and refuses every
difference, listing each one; ``accept_changes`` (``--accept-changes``) accepts
them and records a new *segment* (where it starts, with which values) in the
checkpoint state. ``batch_size`` is refused even then: it defines the offset
batches that the ledger and every replay after a crash rely on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from codistill.app.cli import app
from student.online import TrainerError
from student.online.checkpoint import LATEST, OPTIM_META, STATE_FILE
from tests.helpers.online import run_in_process, setup_online


def _latest(home: Path, name: str) -> Path:
    root = home / "online" / name / "checkpoints"
    return root / (root / LATEST).read_text().strip()


def test_other_hyperparameters_are_refused_with_each_difference_listed(tmp_path: Path) -> None:
    settings, _ = setup_online(tmp_path, 120, seed=41)
    run_in_process(settings, name="hp", max_batches=3, checkpoint_every=3)
    changed = {"lr": 0.02, "alpha": 0.25, "eta": 0.5, "temperature": 2.0, "max_ipw_weight": 5.0,
               "weight_decay": 0.01, "max_grad_norm": 1.0}
    with pytest.raises(TrainerError) as err:
        run_in_process(settings, name="hp", **changed)
    message = str(err.value)
    for line in ("lr: 0.01 -> 0.02", "alpha: 0.5 -> 0.25", "eta: 1.0 -> 0.5",
                 "temperature: 4.0 -> 2.0", "max_ipw_weight: 10.0 -> 5.0",
                 "weight_decay: 0.0 -> 0.01", "max_grad_norm: 5.0 -> 1.0"):
        assert line in message, (line, message)
    assert "accept" in message, message
    assert _latest(tmp_path, "hp").name == "ckpt-000000003"  # nothing was applied

    # batch_size is refused even with the flag: it would move every batch boundary
    with pytest.raises(TrainerError, match=r"batch_size: 16 -> 32") as err:
        run_in_process(settings, name="hp", batch_size=32, accept_changes=True)
    assert "boundar" in str(err.value)


def test_accepted_changes_start_a_new_segment_and_take_effect(tmp_path: Path) -> None:
    settings, _ = setup_online(tmp_path, 120, seed=42)
    run_in_process(settings, name="seg", max_batches=3, checkpoint_every=3)
    before = json.loads((_latest(tmp_path, "seg") / STATE_FILE).read_text())
    summary, trainer = run_in_process(settings, name="seg", max_batches=3, checkpoint_every=3,
                                      lr=0.02, alpha=0.25, accept_changes=True)
    assert summary["resumed_from"] == "ckpt-000000003" and summary["batches"] == 6
    assert trainer.optimizer.param_groups[0]["lr"] == 0.02  # not the checkpoint's 0.01
    ckpt = _latest(tmp_path, "seg")
    state = json.loads((ckpt / STATE_FILE).read_text())
    first, second = state["segments"]
    assert first["start_batches"] == 0 and first["hyperparameters"]["lr"] == 0.01
    assert second["start_batches"] == 3
    assert second["start_offsets"] == before["offsets"]
    assert second["hyperparameters"]["lr"] == 0.02 and second["hyperparameters"]["alpha"] == 0.25
    assert second["changed"] == {"alpha": [0.5, 0.25], "lr": [0.01, 0.02]}
    assert json.loads((ckpt / OPTIM_META).read_text())["param_groups"][0]["lr"] == 0.02

    # the new values are the checkpoint's now: resuming with them needs no flag
    rest, _ = run_in_process(settings, name="seg", lr=0.02, alpha=0.25)
    assert rest["resumed_from"] == "ckpt-000000006"
    assert len(json.loads((Path(rest["checkpoint"]) / STATE_FILE).read_text())["segments"]) == 2
    with pytest.raises(TrainerError, match=r"lr: 0.02 -> 0.01"):
        run_in_process(settings, name="seg")


def test_the_online_command_has_an_accept_changes_flag() -> None:
    res = CliRunner().invoke(app, ["student", "online", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "--accept-changes" in res.output
