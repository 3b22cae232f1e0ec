"""A store that lost (part of) the trainer's teacher version stops the trainer, embedded store.

The trainer's checkpoints are only meaningful against the version they were trained
on. A version that is gone, or holds fewer embeddings / labels than the trainer's
last checkpoint saw, is a *lost store*: training on would dead-letter every event
as an unknown candidate and train on label misses. The trainer must stop with an
error naming the store and the version, and commit nothing past its last good
checkpoint. (The Redis variant, a server restarted empty under a running trainer,
is ``tests/integration/test_trainer_store_loss_redis.py``.)
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from stores import open_store
from streaming import open_stream
from student.online import OnlineTrainer, TrainerError
from student.online.checkpoint import LATEST, STATE_FILE
from tests.helpers.online import (
    VERSION,
    committed_offsets,
    fill_store,
    make_stream,
    produce,
    run_in_process,
    run_in_thread,
    setup_online,
    tiny_corpus,
    trainer_config,
    wait_for,
    waiting_offsets,
)


def _latest(home: Path, name: str) -> tuple[str, dict[str, int]]:
    root = home / "online" / name / "checkpoints"
    latest = (root / LATEST).read_text().strip()
    return latest, json.loads((root / latest / STATE_FILE).read_text())["offsets"]


def test_a_store_rebuilt_with_fewer_labels_is_refused_on_resume(tmp_path: Path) -> None:
    settings, _ = setup_online(tmp_path, 120, seed=21)
    first, _ = run_in_process(settings, name="lossy", checkpoint_every=2, max_batches=4)
    assert first["batches"] == 4
    good = _latest(tmp_path, "lossy")
    store_dir = settings.resolved_store().path
    assert store_dir is not None

    # the store is lost and rebuilt, but only partly: the same version, fewer labels
    corpus = tiny_corpus()
    shutil.rmtree(store_dir)
    with open_store(settings.resolved_store()) as store:
        fill_store(store, corpus, skip_labels=[q.query_id for q in corpus.queries[:5]])
        describe = store.describe()
    with pytest.raises(TrainerError) as err:
        run_in_process(settings, name="lossy", checkpoint_every=2)
    message = str(err.value)
    assert VERSION in message and describe in message and "labels" in message, message
    assert _latest(tmp_path, "lossy") == good  # no checkpoint past the loss
    with open_stream(settings.resolved_stream()) as stream:
        assert committed_offsets(stream, "codistill-trainer-lossy",
                                 settings.stream.topic) == good[1]

    # rebuilt completely (codistill teacher precompute again): the trainer goes on
    shutil.rmtree(store_dir)
    with open_store(settings.resolved_store()) as store:
        fill_store(store, corpus)
    rest, _ = run_in_process(settings, name="lossy", checkpoint_every=2)
    assert rest["resumed_from"] == good[0] and rest["counters"]["label_misses"] == 0


def test_a_version_deleted_under_a_running_trainer_stops_it_before_the_next_checkpoint(
        tmp_path: Path) -> None:
    """No outage to notice (an embedded store): the check before each checkpoint catches it."""
    settings, _ = setup_online(tmp_path, 120, seed=22)
    topic = settings.stream.topic
    with open_stream(settings.resolved_stream()) as stream:
        parts = sorted(stream.partitions(topic))
        expected = waiting_offsets(parts, {p: stream.end_offset(topic, p) for p in parts}, 16)
    trainer = OnlineTrainer(settings, trainer_config(
        name="deleted", until_end=False, checkpoint_every=2, poll_interval_s=0.05))
    thread, errors = run_in_thread(trainer)
    root = tmp_path / "online" / "deleted" / "checkpoints"
    last = f"ckpt-{sum(expected.values()) // 16 // 2 * 2:09d}"  # a checkpoint every 2 batches
    try:
        assert wait_for(lambda: getattr(trainer, "state", None) is not None
                        and {str(p): o for p, o in trainer.state.offsets.items()} == expected
                        and (root / LATEST).exists()
                        and (root / LATEST).read_text().strip() == last, timeout=120)
        good = _latest(tmp_path, "deleted")  # the trainer waits for data: no write under way
        # the version disappears behind the store's back (not through delete_version,
        # which a live lease refuses): a store replaced under the trainer
        db = sqlite3.connect(settings.resolved_store().path / "store.sqlite")
        with db:
            for table in ("embeddings", "labels", "versions", "leases", "pins", "pointers"):
                column = "name" if table == "pointers" else "version"
                value = "current" if table == "pointers" else VERSION
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (value,))  # noqa: S608
        db.close()
        with open_stream(settings.resolved_stream()) as stream:
            produce(stream, topic, make_stream(tiny_corpus(), 120, seed=23))
        thread.join(timeout=60)
        if thread.is_alive():  # the unfixed trainer trains on, waiting for more data
            trainer.request_stop()
            thread.join(timeout=60)
    finally:
        trainer.request_stop()
        thread.join(timeout=60)
        trainer.close()
    assert errors and isinstance(errors[0], TrainerError), errors
    assert VERSION in str(errors[0]) and "sqlite://" in str(errors[0]), errors[0]
    assert "before checkpoint" in str(errors[0]), errors[0]
    assert _latest(tmp_path, "deleted") == good
    with open_stream(settings.resolved_stream()) as stream:
        assert committed_offsets(stream, "codistill-trainer-deleted", topic) == good[1]
