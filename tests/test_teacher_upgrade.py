"""A teacher upgrade end to end, through the real CLI (docs/upgrade.md), on the ``small``
data with the embedded store and event log.

v1 (MiniLM reading 16 subwords) is current and precomputed; a student is distilled on
it and a trainer (a real ``codistill student online`` process) trains on it live. v2,
the same model reading 24 subwords, goes through the gate: on small's 60 valid queries
its gain is not significant, so the default superiority rule rejects it (exit 1), and
non-inferiority with a 0.06 tolerance promotes it. Then it is precomputed:
while it is written the store's current stays v1 and readers get v1. A rollback to v1
(``teacher promote V1 --force``, ``teacher precompute``) and forward again re-encodes
nothing while v1 is still held.
A student is distilled on v2; the old student's warm start and the old trainer's
checkpoint are refused against v2, a trainer warm-started from the new student
trains on v2 labels. Once the old trainer has stopped and the old student is
deleted, v1 expires (``store.ttl_s`` = 1 s) and v2 stays.

Both teachers read few subwords so that their encodings (gate and precompute share one
embedding cache) stay cheap on the small data.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner, Result

from codistill.app.cli import app
from codistill.app.online_demo import produce_demo_stream
from codistill.config import load_settings
from stores import VersionError
from stores.embedded import EmbeddedStore
from tasks import dataset as ds
from teacher import workflow as wf
from tests.helpers.online import ROOT, settings_env, wait_for

pytestmark = pytest.mark.slow

V1_ENV = {"CODISTILL_TEACHER__MAX_SEQ_LENGTH": "16"}
V2_ENV = {"CODISTILL_TEACHER__MAX_SEQ_LENGTH": "24"}
NON_INFERIORITY = {"CODISTILL_TEACHER__GATE__MODE": "non-inferiority",
                   "CODISTILL_TEACHER__GATE__TOLERANCE": "0.06"}
TTL = {"CODISTILL_STORE__TTL_S": "1"}
DISTILL = ["student", "distill", "--init", "random", "--epochs", "2"]
QUICK_DISTILL = {"CODISTILL_DISTILL__MEASURE_SPEED": "false",
                 "CODISTILL_DISTILL__TRACK_VALID": "false"}
TRAINER = ["--batch-size", "16", "--checkpoint-every", "2", "--lr", "1e-4"]


class Cli:
    """``codistill --home HOME -q ...`` in-process, with ``CODISTILL_DATA__SIZE=small``, one
    torch thread (on a shared machine two threads spin against other jobs) and lines wide
    enough that rich wraps no table cell or message."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0, env: dict[str, str] | None = None) -> Result:
        res = self.runner.invoke(app, ["--home", str(self.home), "-q", *args],
                                 env={"CODISTILL_DATA__SIZE": "small", "CODISTILL_THREADS": "1",
                                      "COLUMNS": "250", **(env or {})})
        assert res.exit_code == code, (args, res.output, res.exception)
        return res


def _state(home: Path, trainer: str) -> dict[str, Any]:
    root = home / "online" / trainer / "checkpoints"
    return json.loads((root / (root / "LATEST").read_text().strip() / "state.json").read_text())


def _holds(store: EmbeddedStore, version: str) -> set[str]:
    return {f"{h.kind} {h.owner}" for h in store.holds(version)}


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """``CODISTILL_THREADS`` sets torch's process-wide thread count: leave it as found."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_new_teacher_version_replaces_the_old_one_end_to_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_threads: None) -> None:
    home = tmp_path / "home"
    cli = Cli(home)
    settings = load_settings(home=home, data={"size": "small"})
    store = EmbeddedStore(home / "store")

    # -- v1: current teacher, precomputed; a student and a live trainer on it -------------
    cli("data", "build", "--size", "small")
    cli("teacher", "precompute", env=V1_ENV)
    v1 = wf.zero_shot_version(load_settings(home=home, teacher={"max_seq_length": 16}))
    assert store.current() == v1 == wf.teacher_registry(settings).current_version()
    cli(*DISTILL, env=QUICK_DISTILL)
    s1 = json.loads((home / "students" / "current.json").read_text())["student_version"]
    assert store.pins(v1) == {f"student:{s1}"}
    produce_demo_stream(settings, n_requests=300, malformed_rate=0.0)
    log = tmp_path / "old-trainer.log"
    with open(log, "wb") as out:  # a live trainer, as in production: stopped by SIGTERM
        old_trainer = subprocess.Popen(
            [sys.executable, "-m", "codistill.app.cli", "-q", "student", "online", "--name",
             "search", "--init-student", str(home / "students" / s1), *TRAINER],
            cwd=ROOT, env={**settings_env(settings), "CODISTILL_DATA__SIZE": "small"},
            stdout=out, stderr=subprocess.STDOUT)
    try:
        _upgrade(cli, home, store, v1, s1, old_trainer, log, monkeypatch)
    finally:
        if old_trainer.poll() is None:
            old_trainer.kill()
            old_trainer.wait()
        store.close()


def _upgrade(cli: Cli, home: Path, store: EmbeddedStore, v1: str, s1: str,
             old_trainer: subprocess.Popen[bytes], log: Path,
             monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(home=home, data={"size": "small"})
    reg = wf.teacher_registry(settings)

    # -- the gate: equal -> user error; superiority rejects (exit 1); non-inferiority promotes
    same = cli("teacher", "promote", "minilm", env=V1_ENV, code=2)
    assert "the current teacher already" in same.output
    rejected = cli("teacher", "promote", "minilm", env=V2_ENV, code=1)
    v2 = wf.zero_shot_version(load_settings(home=home, teacher={"max_seq_length": 24}))
    assert v2 != v1 and f"{v2} is not promoted" in rejected.output
    assert "NOT promoted (valid: lower bound" in rejected.output
    assert reg.current_version() == v1 and reg.load(v2).gate["promote"] is False
    promoted = cli("teacher", "promote", "minilm", env={**V2_ENV, **NON_INFERIORITY})
    assert "promoted to current" in promoted.output and "gate (non-inferiority)" in promoted.output
    card = reg.load(v2)
    assert card.gate["promote"] and card.gate["mode"] == "non-inferiority"
    assert {r["name"] for r in card.gate["sets"]} == {"valid", "nl2code-prose"}
    assert all(r["n_queries"] == 60 for r in card.gate["sets"])
    assert reg.current_version() == v2 and store.current() == v1  # the store has not moved

    # the old trainer is live on v1 and holds a lease on it
    assert wait_for(lambda: (home / "online/search/checkpoints/LATEST").exists()
                    or old_trainer.poll() is not None, timeout=180), "no checkpoint in 180 s"
    assert old_trainer.poll() is None, log.read_text()
    assert _state(home, "search")["teacher_version"] == v1
    assert _holds(store, v1) == {f"pin student:{s1}", "lease trainer:search"}

    # -- precompute v2: nobody reads it before it is complete ---------------------------------
    query = ds.read_split(settings, "train")[0].query_id
    seen: list[str] = []

    def probe(stage: str, chunk: int) -> None:
        with EmbeddedStore(home / "store") as reader:  # another connection, as a reader has
            assert reader.current() == v1
            version, [record] = reader.read_current_labels([query])
            assert version == v1 and record is not None and record.teacher_version == v1
            assert reader.get_version(v2).status == "writing"
            with pytest.raises(VersionError, match="only a complete one"):
                reader.set_current(v2)
        seen.append(stage)

    monkeypatch.setattr(wf, "precompute", functools.partial(wf.precompute, on_chunk=probe))
    done = cli("teacher", "precompute", env=TTL)
    monkeypatch.undo()
    assert "train:labels" in seen and f"teacher {v2}:" in done.output
    assert store.current() == v2 and store.get_version(v2).status == "complete"
    assert store.read_current_labels([query])[0] == v2
    assert store.expiring() == {}  # v1 is pinned and leased, so it does not expire

    # -- a rollback while v1 is still held, and forward again: nothing is re-encoded ----------
    back = cli("teacher", "promote", v1, "--force")
    assert f"forced: {v1} is current" in back.output and reg.current_version() == v1
    assert f"teacher {v1}: 0/" in cli("teacher", "precompute").output  # all there still
    assert store.current() == v1
    cli("teacher", "promote", v2, "--force")
    assert f"teacher {v2}: 0/" in cli("teacher", "precompute").output
    assert store.current() == v2 == reg.current_version()

    # -- a student on v2; the trainer moves to v2 with it -------------------------------------
    cli(*DISTILL, env=QUICK_DISTILL)
    s2 = json.loads((home / "students" / "current.json").read_text())["student_version"]
    assert s2 != s1 and store.pins(v2) == {f"student:{s2}"}
    stale = cli("student", "online", "--name", "search-v2", "--init-student",
                str(home / "students" / s1), "--until-end", *TRAINER, code=2)
    assert f"teacher {v1}" in stale.output and "Distil a new student" in stale.output
    cli("student", "online", "--name", "search-v2", "--init-student", str(home / "students" / s2),
        "--until-end", *TRAINER)
    new = _state(home, "search-v2")
    assert new["teacher_version"] == v2 and new["batches"] > 5
    assert new["counters"]["label_hits"] > 0 and not new["counters"].get("label_misses")

    # -- the old trainer stops; its checkpoint never distils from v2 --------------------------
    assert old_trainer.poll() is None, log.read_text()  # live: it waits for more events
    old_trainer.send_signal(signal.SIGTERM)
    assert old_trainer.wait(timeout=60) == 0, log.read_text()
    assert _state(home, "search")["batches"] > 0
    assert _holds(store, v1) == {f"pin student:{s1}"}  # its lease went with it
    resumed = cli("student", "online", "--name", "search", "--teacher-version", v2, code=2)
    assert f"distil from '{v1}'" in resumed.output and "another trainer name" in resumed.output

    # -- the old student goes, and with it the last hold on v1: v1 expires, v2 stays ----------
    cli("student", "delete", s2, code=2)  # the current student is refused
    gone = cli("student", "delete", s1, env=TTL)
    assert f"deleted student {s1}" in gone.output and f"{v1} expires" in gone.output
    assert not (home / "students" / s1).exists() and store.pins(v1) == set()
    assert set(store.expiring()) == {v1}
    assert "expires in" in cli("store", "info", env=TTL).output
    time.sleep(1.2)
    swept = cli("store", "expire", env=TTL)
    assert f"expired {v1}" in swept.output
    assert [i.teacher_version for i in store.versions()] == [v2] and store.current() == v2
    info = cli("store", "info").output
    assert v2 in info and v1 not in info
    assert v1 in reg.versions()  # the card stays: a rollback re-precomputes it
