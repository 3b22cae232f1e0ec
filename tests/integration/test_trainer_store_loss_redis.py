"""A Redis without persistence restarted under a running trainer: reachable, but empty.

The trainer sees an outage, waits it out, and reconnects to a server that holds
none of its teacher version. It must notice at once (after the reconnect, before
the batch it was retrying uses the empty answers), stop with an error naming the
store and the version, send no ``unknown_candidate`` dead letters and commit
nothing past its last good checkpoint. A private redis-server (no AOF, no RDB) is
stopped and started again on the same port; the event log is the embedded one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codistill.config import load_settings
from stores import open_store
from streaming import open_stream
from streaming.dlq import decode_dead_letter
from student.online import OnlineTrainer, TrainerError
from student.online.checkpoint import LATEST, STATE_FILE
from tests.helpers.online import (
    VERSION,
    committed_offsets,
    fill_store,
    make_stream,
    produce,
    read_topic,
    run_in_thread,
    tiny_corpus,
    trainer_config,
    wait_for,
    waiting_offsets,
)
from tests.helpers.redis_process import RedisProcess, free_port

pytestmark = pytest.mark.integration


def test_a_redis_restarted_empty_stops_the_trainer_without_dead_letters_or_commits(
        tmp_path: Path) -> None:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisProcess(free_port(), workdir, durable=False)
    server.start()
    trainer = None
    thread = None
    try:
        settings = load_settings(home=tmp_path, threads=1, store={
            "backend": "redis", "redis_url": f"redis://127.0.0.1:{server.port}/0",
            "namespace": "lost"})
        topic, corpus = settings.stream.topic, tiny_corpus()
        with open_store(settings.resolved_store()) as store:
            fill_store(store, corpus)
            describe = store.describe()
        with open_stream(settings.resolved_stream()) as stream:
            stream.ensure_topics()
            produce(stream, topic, make_stream(corpus, 120, seed=31))
            parts = sorted(stream.partitions(topic))
            expected = waiting_offsets(parts, {p: stream.end_offset(topic, p) for p in parts}, 16)

        # live mode: the trainer applies what is there, then waits for data
        trainer = OnlineTrainer(settings, trainer_config(
            name="lost", until_end=False, checkpoint_every=2, poll_interval_s=0.05,
            backoff={"initial_s": 0.05, "max_s": 0.2}))
        thread, errors = run_in_thread(trainer)
        root = tmp_path / "online" / "lost" / "checkpoints"
        good = f"ckpt-{sum(expected.values()) // 16 // 2 * 2:09d}"  # every 2 batches
        assert wait_for(lambda: getattr(trainer, "state", None) is not None
                        and {str(p): o for p, o in trainer.state.offsets.items()} == expected
                        and (root / LATEST).exists()
                        and (root / LATEST).read_text().strip() == good, timeout=120)
        good_offsets = json.loads((root / good / STATE_FILE).read_text())["offsets"]
        dead_before = trainer.counters.get("dlq", 0)

        server.kill()
        with open_stream(settings.resolved_stream()) as stream:
            produce(stream, topic, make_stream(corpus, 120, seed=32))  # the next batches
        assert wait_for(lambda: trainer.counters.get("store_retries", 0) >= 2, timeout=60)
        server.start()  # same port, no persistence: reachable and empty
        thread.join(timeout=30)
        if thread.is_alive():  # the unfixed trainer trains on against the empty store
            trainer.request_stop()
            thread.join(timeout=60)
        counters = dict(trainer.counters)
        trainer.close()
        trainer = None

        assert errors and isinstance(errors[0], TrainerError), errors
        message = str(errors[0])
        assert VERSION in message and describe in message, message
        assert "after a store outage" in message, message  # caught on reconnect, not later
        assert (root / LATEST).read_text().strip() == good  # no checkpoint after the loss
        assert counters.get("dlq", 0) == dead_before
        with open_stream(settings.resolved_stream()) as stream:
            assert committed_offsets(stream, "codistill-trainer-lost", topic) == good_offsets
            letters = [decode_dead_letter(r.value)
                       for r in read_topic(stream, settings.stream.dlq_topic)]
        assert [d for d in letters if d.code == "unknown_candidate"] == []
    finally:
        if trainer is not None:
            trainer.request_stop()
            if thread is not None:
                thread.join(timeout=60)
            trainer.close()
        server.kill()
