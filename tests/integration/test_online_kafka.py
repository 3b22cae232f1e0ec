"""The online trainer on a real Kafka broker and a real Redis store (no mocks).

* exactly-once across SIGKILLs, as in ``tests/test_online_trainer.py``, with the
  events and dead letters on Kafka, the group offsets in Kafka's coordinator and
  the labels in Redis;
* a Redis outage in the middle of training: a private redis-server (AOF on, so a
  restart keeps the data) is killed and restarted on the same port; the trainer
  backs off, counts the outage, resumes, and ends with the same weights as a run
  that saw no outage.

Topics, groups and Redis namespaces are unique per test, so the tests share the
session's services with everything else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from codistill.config import Settings
from stores import open_store
from streaming import open_stream
from streaming.dlq import decode_dead_letter
from streaming.generator import VALID
from student.online import OnlineTrainer, OnlineTrainerConfig
from student.online.checkpoint import LATEST, STATE_FILE
from tests.helpers.online import (
    TRAINER,
    assert_same_weights,
    end_offsets,
    fill_store,
    finish,
    kafka_redis_settings,
    make_stream,
    produce,
    read_topic,
    run_trainer,
    seeded_kill_delays,
    start_trainer,
    student_weights,
    tiny_corpus,
    wait_for,
)
from tests.helpers.redis_process import RedisProcess, free_port

pytestmark = pytest.mark.integration


def _settings(home: Path, bootstrap: str, redis_url: str) -> Settings:
    return kafka_redis_settings(home, bootstrap, redis_url, "online", partitions=4)


def _populate(settings: Settings, n_requests: int, seed: int, malformed_rate: float = 0.0):
    corpus = tiny_corpus()
    store = open_store(settings.resolved_store())
    try:
        fill_store(store, corpus)
    finally:
        store.close()
    generated = make_stream(corpus, n_requests, seed, malformed_rate)
    with open_stream(settings.resolved_stream()) as stream:
        stream.ensure_topics()
        produce(stream, settings.stream.topic, generated)
    return generated


def _run(settings: Settings, **kw: object) -> dict:
    with OnlineTrainer(settings, OnlineTrainerConfig.model_validate({**TRAINER, **kw})) as t:
        return t.run()


def _checkpoint_offsets(home: Path, name: str) -> tuple[str, list[dict[str, int]]]:
    """LATEST and the offsets of the kept checkpoints (call only while no trainer runs)."""
    root = home / "online" / name / "checkpoints"
    latest = (root / LATEST).read_text().strip()
    return latest, [json.loads((p / STATE_FILE).read_text())["offsets"]
                    for p in sorted(root.glob("ckpt-*"))]


def test_exactly_once_on_kafka_and_redis_across_sigkills(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> None:
    settings = _settings(tmp_path, kafka_bootstrap, redis_url)
    gen = _populate(settings, 240, seed=21, malformed_rate=0.05)
    ref = _run(settings, name="ref")
    assert ref["batches"] >= 20, ref["batches"]

    stream = open_stream(settings.resolved_stream())
    topic, group = settings.stream.topic, "codistill-trainer-crashy"
    crashy = {**TRAINER, "name": "crashy"}
    log = tmp_path / "crashy.log"

    def check_commits(step: str) -> None:
        latest, ckpts = _checkpoint_offsets(tmp_path, "crashy")
        got = {str(p): stream.committed(group, topic, p) or 0 for p in stream.partitions(topic)}
        assert got in ckpts, (step, got, ckpts)  # never ahead of a checkpoint
        if step.startswith("after_checkpoint"):
            assert got == ckpts[-2] and latest == "ckpt-000000015"  # LATEST's not committed yet

    for step in ("after_step:6", "before_latest:9", "after_checkpoint:15"):
        run = run_trainer(settings, crashy, crash_at=step, log_path=log)
        assert run.killed, (step, run.returncode, run.log[-3000:])
        check_commits(step)
    latest = tmp_path / "online" / "crashy" / "checkpoints" / LATEST
    before = latest.read_text()
    proc = start_trainer(settings, crashy, log_path=log)
    assert wait_for(lambda: latest.read_text() != before, timeout=120)
    time.sleep(seeded_kill_delays(3, 1, 0.0, 0.4)[0])
    proc.kill()
    run = finish(proc, log)
    if run.killed:
        check_commits("random")

    final = run_trainer(settings, crashy, log_path=log)
    assert final.returncode == 0, final.log[-3000:]
    assert_same_weights(student_weights(Path(final.summary["student_dir"])),
                        student_weights(Path(ref["student_dir"])))
    for key in ("batches", "optimizer_steps", "ledger_batches", "offsets"):
        assert final.summary[key] == ref[key], key
    assert final.summary["counters"]["dlq"] == ref["counters"]["dlq"]
    ends = end_offsets(stream, topic)
    assert final.summary["offsets"] == ends
    assert {str(p): stream.committed(group, topic, p) for p in stream.partitions(topic)} == ends
    letters = {(d.source_partition, d.source_offset) for d in (
        decode_dead_letter(r.value) for r in read_topic(stream, settings.stream.dlq_topic))}
    assert len(letters) == sum(n for k, n in gen.counts.items() if k != VALID)
    stream.close()


# -- Redis outage ---------------------------------------------------------------------------
def test_redis_outage_mid_training_is_survived_without_skipping_a_batch(
        tmp_path: Path, kafka_bootstrap: str) -> None:
    server = RedisProcess(free_port(), tmp_path, durable=True)
    server.start()
    try:
        settings = _settings(tmp_path, kafka_bootstrap, f"redis://127.0.0.1:{server.port}/0")
        _populate(settings, 240, seed=22)
        ref = _run(settings, name="ref")

        cfg = OnlineTrainerConfig.model_validate({
            **TRAINER, "name": "outage", "backoff": {"initial_s": 0.05, "max_s": 0.5}})
        trainer = OnlineTrainer(settings, cfg)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(trainer.run()), daemon=True)
        thread.start()
        assert wait_for(lambda: getattr(trainer, "state", None) is not None
                        and trainer.state.batches >= 3, timeout=120)
        server.kill()
        assert wait_for(lambda: trainer.counters.get("store_retries", 0) >= 3, timeout=60)
        batches_during = trainer.state.batches
        time.sleep(1.0)
        assert trainer.state.batches == batches_during  # stuck on the same batch, not skipping
        assert thread.is_alive()  # and not crashed
        server.start()  # same port, data reloaded from the AOF
        thread.join(timeout=180)
        assert not thread.is_alive()
        outages = trainer.metrics.value("codistill_trainer_store_outages_total")
        trainer.close()

        assert result["counters"]["store_outages"] >= 1 and outages >= 1
        assert result["counters"]["store_retries"] >= 3
        assert result["batches"] == ref["batches"] and result["ledger_batches"] == ref["batches"]
        assert result["offsets"] == ref["offsets"]
        assert result["optimizer_steps"] == ref["optimizer_steps"]
        assert_same_weights(student_weights(Path(result["student_dir"])),
                            student_weights(Path(ref["student_dir"])))
        with open_stream(settings.resolved_stream()) as stream:
            topic = settings.stream.topic
            assert result["offsets"] == end_offsets(stream, topic)
            assert {str(p): stream.committed("codistill-trainer-outage", topic, p)
                    for p in stream.partitions(topic)} == result["offsets"]
    finally:
        server.kill()


def test_online_throughput_benchmark_quick(tmp_path: Path, kafka_bootstrap: str,
                                           redis_url: str) -> None:
    """benchmarks/online_throughput.py --quick runs end to end and writes a complete result."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "online_throughput-quick.json"
    env = {**os.environ, "CODISTILL_TEST_KAFKA": kafka_bootstrap,
           "CODISTILL_TEST_REDIS_URL": redis_url}
    proc = subprocess.run(
        [sys.executable, "benchmarks/online_throughput.py", "--quick", "--out", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    produced = data["produce"]["messages"]
    assert produced > 1000
    assert data["kafka_raw_consume"]["records"] == produced == data["trainer"]["events"]
    assert data["trainer"]["events_per_s"] > 0 and data["trainer"]["optimizer_steps"] > 0
    asym = data["trainer_asym_bow"]  # the query-only student, candidate vectors from Redis
    assert asym["events"] == produced and asym["optimizer_steps"] > 0
    assert asym["label_hits"] == data["trainer"]["label_hits"] > 0
    assert data["redis_raw"]["mget_keys_per_s"] > data["redis_raw"]["get_labels_per_s"] > 0
    assert data["machine"]["cores"] and "step" in data["trainer"]["phase_seconds"]
