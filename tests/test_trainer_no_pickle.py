"""Trainer checkpoints hold JSON and safetensors only; a pickle payload is refused.

Unpickling runs code, and a checkpoint directory is a file anyone with write
access to ``HOME`` can replace, so the drift detectors' state is JSON too: the
last ``drift_window`` inputs of each signal since its detector last reset, replayed
into a fresh ADWIN on resume. The rebuilt detector equals the uninterrupted one
when the window held every input since that reset; otherwise it holds the last
``drift_window`` inputs only (both tested here).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from student.online.checkpoint import LATEST, CheckpointError
from student.online.telemetry import DriftMonitor
from tests.helpers.online import ROOT, run_in_process, setup_online

PRODUCT = ("codistill", "serving", "student", "stores", "streaming", "teacher", "tasks")
UNSAFE = re.compile(r"^\s*(import pickle|from pickle import|import cloudpickle|import dill)\b"
                    r"|\bpickle\.(loads?|dumps?|Unpickler|Pickler)\b|\btorch\.load\(", re.M)


def _latest(home: Path, name: str) -> Path:
    root = home / "online" / name / "checkpoints"
    return root / (root / LATEST).read_text().strip()


def _values(seed: int, n: int, shifts: tuple[int, ...] = ()) -> list[float]:
    rng = random.Random(seed)
    out, mean = [], 0.0
    for i in range(n):
        if i in shifts:
            mean += 3.0
        out.append(rng.gauss(mean, 1.0))
    return out


def _same(a: DriftMonitor, b: DriftMonitor) -> None:
    for signal in ("loss", "agreement"):
        da, db = a.detectors[signal], b.detectors[signal]
        assert (da.width, da.estimation, da.variance, da.drift_detected) == (
            db.width, db.estimation, db.variance, db.drift_detected), signal
    assert a.events == b.events and a.last_event == b.last_event


def test_a_rebuilt_drift_monitor_equals_the_uninterrupted_one_within_its_window() -> None:
    values = _values(0, 900, shifts=(300, 600))  # two drifts: the detector resets twice
    whole = DriftMonitor(window=2000)
    for i, v in enumerate(values[:700]):
        whole.update("loss", v, i)
        whole.update("agreement", -v, i)
    assert whole.events["loss"] >= 1
    rebuilt = DriftMonitor.from_json(json.loads(json.dumps(whole.to_json())), window=2000)
    _same(whole, rebuilt)
    for i, v in enumerate(values[700:], start=700):  # and it stays equal from there on
        assert whole.update("loss", v, i) == rebuilt.update("loss", v, i)
        assert whole.update("agreement", -v, i) == rebuilt.update("agreement", -v, i)
    _same(whole, rebuilt)
    assert whole.state(900) == rebuilt.state(900)


def test_a_window_shorter_than_the_history_rebuilds_only_its_last_inputs() -> None:
    values = _values(1, 300)  # no drift: the detector never resets
    whole = DriftMonitor(window=50)
    for i, v in enumerate(values):
        whole.update("loss", v, i)
    data = whole.to_json()
    assert len(data["inputs"]["loss"]) == 50 and data["truncated"]["loss"] is True
    rebuilt = DriftMonitor.from_json(data, window=50)
    assert whole.detectors["loss"].width == 300
    assert rebuilt.detectors["loss"].width == 50  # the last 50 inputs, not the whole history
    short = DriftMonitor(window=50)
    for i, v in enumerate(values[-50:]):
        short.update("loss", v, i)
    assert rebuilt.detectors["loss"].estimation == short.detectors["loss"].estimation


def test_checkpoints_hold_only_json_and_safetensors_and_drift_survives_a_resume(
        tmp_path: Path) -> None:
    settings, _ = setup_online(tmp_path, 120, seed=51)
    ref, _ = run_in_process(settings, name="ref")
    run_in_process(settings, name="resumed", checkpoint_every=1, max_batches=9)
    ckpt = _latest(tmp_path, "resumed")
    for path in ckpt.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:1]
            assert path.suffix in (".json", ".safetensors"), path.name
            assert head != b"\x80" or path.suffix == ".safetensors", path.name
            if path.suffix == ".json":
                json.loads(path.read_text())
    rest, _ = run_in_process(settings, name="resumed")
    assert rest["resumed_from"] == ckpt.name
    assert rest["drift"] == ref["drift"]


@pytest.mark.parametrize("planted", ["drift.pkl", "extra.bin"])
def test_a_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path: Path, planted: str) -> None:
    import pickle  # the test writes one; product code never does

    settings, _ = setup_online(tmp_path, 80, seed=52)
    run_in_process(settings, name="planted", max_batches=3, checkpoint_every=3)
    ckpt = _latest(tmp_path, "planted")
    (ckpt / planted).write_bytes(pickle.dumps({"anything": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="pickle") as err:
        run_in_process(settings, name="planted")
    assert planted in str(err.value)


def test_no_product_module_pickles_or_torch_loads() -> None:
    hits = [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
            for package in PRODUCT for path in sorted((ROOT / package).rglob("*.py"))
            for text in [path.read_text(encoding="utf-8")] for m in UNSAFE.finditer(text)]
    assert hits == []


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_not_a_pickle(
        tmp_path: Path) -> None:
    """The first 8 bytes of safetensors are its header length: 1 in 32 starts with 0x80."""
    import torch
    from safetensors.torch import save_file

    from student.online.checkpoint import refuse_pickles

    for n in range(64):
        save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"), {"pad": "x" * n})
        if (tmp_path / "model.safetensors").read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no header length with a low byte of 0x80 in 64 tries")
    refuse_pickles(tmp_path)  # accepted
    (tmp_path / "model.safetensors").rename(tmp_path / "model.json")
    with pytest.raises(CheckpointError, match="model.json"):
        refuse_pickles(tmp_path)
