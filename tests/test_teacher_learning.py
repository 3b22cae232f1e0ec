"""Learning happened: a short seeded fine-tune of the real MiniLM teacher on the demo
train split raises held-out MRR@10, and the promotion gate (valid plus both guard
sets) keeps the old teacher when the new one is worse. Slow (real training on CPU), run in CI."""

from pathlib import Path

import pytest

from codistill.config import load_settings
from tasks import dataset as ds
from teacher import workflow as wf
from tests.helpers.data import build_data

pytestmark = pytest.mark.slow

# Stated margin. The demo's fine-tuning settings (60 steps, 2 layers) with the teacher
# reading 64 subwords instead of the demo's 96 / 128, which cuts this module's encoding
# in CI by about a third. At 96 subwords the demo gave test MRR@10 0.7124 -> 0.7461 and
# valid +0.014 (benchmarks/results/demo-summary.json); at 64 the gain was checked once by
# hand (no result file; this test is what re-measures it). Asserted with slack for
# thread-count / BLAS nondeterminism.
MIN_GAIN = 0.01
SEQ = 64
TRAIN = {"max_steps": 60, "batch_size": 16, "lr": 5e-5, "train_layers": 2, "max_seq_length": SEQ,
         "time_budget_s": 1e9, "seed": 0}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("learn")
    s = load_settings(home=home, data={"size": "demo"})
    build_data(s)
    return home


def _settings(home: Path, **train):
    s = load_settings(home=home, data={"size": "demo"}, teacher={"max_seq_length": SEQ})
    s.teacher.train = s.teacher.train.model_copy(update={**TRAIN, **train})
    return s


def test_finetune_raises_heldout_mrr(home: Path) -> None:
    s = _settings(home)
    test = ds.read_split(s, "test")
    assert len(test) >= 300
    before = wf.evaluate_version(s, wf.ensure_current(s), test, progress=False)
    result = wf.train_and_promote(s, progress=False)
    after = wf.evaluate_version(s, result["candidate"], test, progress=False)
    assert after["mrr@10"] >= before["mrr@10"] + MIN_GAIN, (before, after)
    assert result["promoted"] and wf.teacher_registry(s).current_version() == result["candidate"]
    # promoted by the gate (paired bootstrap, superiority), and the card says so
    gate = result["gate"]
    assert gate["mode"] == "superiority" and gate["promote"]
    (valid,) = [r for r in gate["sets"] if r["name"] == "valid"]
    assert valid["lower"] > 0 and valid["n_queries"] == len(ds.read_split(s, "valid"))
    # the guard sets are judged beside valid (superiority: each bound > -tolerance)
    guards = {r["name"]: r for r in gate["sets"] if r["name"] != "valid"}
    assert set(guards) == {"nl2code-prose", "code2code-versions"}
    for name, r in guards.items():
        assert r["threshold"] == -s.teacher.gate.tolerance and r["passed"]
        assert r["n_queries"] == len(ds.read_guard(s, name)) >= 300
    assert set(result["guards"]) == set(guards)
    assert wf.teacher_registry(s).load(result["candidate"]).gate == gate


def test_promotion_keeps_old_teacher_when_new_is_worse(home: Path) -> None:
    s = _settings(home, max_steps=8, batch_size=8, lr=1e-2)  # a destructive learning rate
    reg = wf.teacher_registry(s)
    old = wf.ensure_current(s)
    result = wf.train_and_promote(s, progress=False)
    assert result["valid_mrr@10_candidate"] < result["valid_mrr@10_previous"]
    assert not result["promoted"] and not result["gate"]["promote"]
    assert "valid: lower bound" in result["gate"]["reason"]
    assert {r["name"] for r in result["gate"]["sets"]} == {"valid", "nl2code-prose",
                                                           "code2code-versions"}
    assert reg.current_version() == old
    assert result["candidate"] in reg.versions()  # kept for inspection, not current
