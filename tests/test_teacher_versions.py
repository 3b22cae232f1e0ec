"""Teacher versions are content-addressed: the tensors plus every setting that changes
the teacher's outputs (sequence length, pooling, normalization, logit scale, tokenizer),
and nothing else (not file bytes, budgets, step counts or lineage)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from codistill.config import TrainSettings, load_settings
from teacher import workflow as wf
from teacher.train import FinetuneResult, save_finetuned

ROOT = Path(__file__).resolve().parents[1]


def _zero_shot_in_subprocess(home: Path, **teacher: object) -> str:
    code = ("import sys; from codistill.config import load_settings; from teacher import workflow;"
            f"s = load_settings(home={str(home)!r}, teacher={teacher!r});"
            "print(workflow.zero_shot_version(s))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                          "PATH": "/usr/bin:/bin"})
    return out.stdout.strip().splitlines()[-1]


def test_zero_shot_versions_depend_on_content_and_output_settings_only(tmp_path: Path) -> None:
    here = wf.zero_shot_version(load_settings(home=tmp_path / "a"))
    assert here == _zero_shot_in_subprocess(tmp_path / "b")  # another home, another process
    assert wf.zero_shot_version(load_settings(home=tmp_path / "a", teacher={
        "max_seq_length": 256})) != here
    assert wf.zero_shot_version(load_settings(home=tmp_path / "a", teacher={
        "logit_scale": 10.0})) != here
    card = wf.teacher_registry(load_settings(home=tmp_path / "a")).load(here)
    assert card.id_scheme == 2 and card.tensors_sha256 and card.pooling and card.normalize


def test_the_same_weights_get_the_same_version_whatever_the_lineage(tmp_path: Path) -> None:
    """Two saves of identical weights with other budgets, data and parents: one version."""
    s = load_settings(home=tmp_path)
    teacher = wf.open_teacher(s, wf.ensure_current(s), progress=False)
    reg = wf.teacher_registry(s)
    result = FinetuneResult(steps=3, seconds=1.0, examples_seen=48)
    one = save_finetuned(teacher, reg, TrainSettings(max_steps=3), "data-a", result)
    other = save_finetuned(teacher, reg, TrainSettings(max_steps=99, time_budget_s=5.0,
                                                       train_layers=6), "data-b",
                           FinetuneResult(steps=99, seconds=9.0, examples_seen=1))
    assert one.teacher_version == other.teacher_version
    assert one.tensors_sha256 and one.id_scheme == 2
    # the lineage is still on the card, just not in the id
    assert reg.load(one.teacher_version).data_hash == "data-b"


def test_store_info_flags_versions_written_under_the_old_scheme(tmp_path: Path) -> None:
    from codistill.app.cli import app
    from stores.base import VersionInfo
    from stores.embedded import EmbeddedStore

    with EmbeddedStore(tmp_path / "h" / "store") as store:
        store.begin_version(VersionInfo(teacher_version="minilm-zs-0123456789", model="m",
                                        logit_scale=20.0, dim=4, meta={"kind": "zero-shot"}))
        store.begin_version(VersionInfo(teacher_version="minilm-zs-abcdefabcd", model="m",
                                        logit_scale=20.0, dim=4, meta={"id_scheme": "2"}))
    res = CliRunner().invoke(app, ["--home", str(tmp_path / "h"), "store", "info"])
    assert res.exit_code == 0, res.output
    old = next(ln for ln in res.output.splitlines() if "minilm-zs-0123" in ln)
    new = next(ln for ln in res.output.splitlines() if "minilm-zs-abcd" in ln)
    assert "(old id" in old and "old id" not in new
