"""Retention on a real Kafka broker: a prefix deleted under a trainer's checkpoint.

``KafkaAdminClient.delete_records`` moves the partition's log start past the
checkpoint's offset; the trainer must stop naming the gap, and with
``accept_gap`` record it and finish. Topic, group and Redis namespace are unique
per test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, TopicPartition

from codistill.config import Settings
from stores import open_store
from streaming import open_stream
from streaming.base import OffsetOutOfRange
from student.online import OnlineTrainer, OnlineTrainerConfig, TrainerError
from student.online.checkpoint import LATEST, STATE_FILE
from tests.helpers.online import (
    TRAINER,
    end_offsets,
    fill_store,
    kafka_redis_settings,
    make_stream,
    produce,
    tiny_corpus,
)

pytestmark = pytest.mark.integration


def _settings(home: Path, bootstrap: str, redis_url: str) -> Settings:
    return kafka_redis_settings(home, bootstrap, redis_url, "retention", partitions=2)


def _run(settings: Settings, **kw: object) -> dict:
    with OnlineTrainer(settings, OnlineTrainerConfig.model_validate({**TRAINER, **kw})) as t:
        return t.run()


def test_a_deleted_kafka_prefix_past_the_checkpoint_is_a_named_gap(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> None:
    settings = _settings(tmp_path, kafka_bootstrap, redis_url)
    corpus = tiny_corpus()
    with open_store(settings.resolved_store()) as store:
        fill_store(store, corpus)
    topic = settings.stream.topic
    with open_stream(settings.resolved_stream()) as stream:
        stream.ensure_topics()
        produce(stream, topic, make_stream(corpus, 150, seed=4))
    first = _run(settings, name="k", max_batches=2, checkpoint_every=2)
    offsets = {int(p): o for p, o in first["offsets"].items()}
    with open_stream(settings.resolved_stream()) as stream:
        p = max(offsets, key=lambda q: stream.end_offset(topic, q) - offsets[q])
        cut = offsets[p] + 5
        assert stream.end_offset(topic, p) > cut
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.delete_records({TopicPartition(topic, p): cut})
        finally:
            admin.close()
        assert stream.start_offset(topic, p) == cut
        with pytest.raises(OffsetOutOfRange,
                           match=rf"offset {offsets[p]} is out of range, below.*{cut}"):
            stream.read(topic, p, offsets[p], 3)
        assert [r.offset for r in stream.read(topic, p, cut, 2)] == [cut, cut + 1]
        ends = end_offsets(stream, topic)
    with pytest.raises(TrainerError, match=rf"{topic}\[{p}\].*{offsets[p]}.*{cut}.*accept.gap"):
        _run(settings, name="k")
    done = _run(settings, name="k", accept_gap=True)
    assert done["offsets"] == ends and done["counters"]["gap_records"] == 5
    root = tmp_path / "online" / "k" / "checkpoints"
    state = json.loads((root / (root / LATEST).read_text().strip() / STATE_FILE).read_text())
    assert [topic, p, [[offsets[p], cut]]] in state["ledger"]["gaps"]
