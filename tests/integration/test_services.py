"""The real services that scripts/services.sh starts actually work.

Each test talks to a real Redis / Kafka / Prometheus (started by the session
fixtures in tests/conftest.py, or named by ``CODISTILL_TEST_*``); the last two
validate the Docker deployment files offline with the same tools CI uses.
No mocks and no skips: a missing service or tool fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from tests.helpers.redis_process import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH; run `bash scripts/install_system.sh` first")
    return path


# ---------------------------------------------------------------- redis
def test_redis_set_get(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    key = f"codistill:itest:{uuid.uuid4().hex}"
    try:
        assert client.ping()
        assert client.set(key, b"\x00teacher\xff", ex=60)
        assert client.get(key) == b"\x00teacher\xff"
        assert client.ttl(key) > 0
    finally:
        client.delete(key)
        client.close()


def test_shipped_redis_persists_with_aof(redis_url: str) -> None:
    """A Redis restarted empty would look reachable but have lost every label: the
    Redis that scripts/services.sh and docker-compose.yml start keeps an AOF."""
    import redis
    import yaml

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    finally:
        client.close()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command


# ---------------------------------------------------------------- kafka
def test_kafka_roundtrip_preserves_per_key_order(kafka_bootstrap: str) -> None:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

    topic = f"codistill-itest-{uuid.uuid4().hex[:12]}"
    group = f"{topic}-group"
    n_messages, n_keys = 200, 10

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="codistill-itest")
    try:
        admin.create_topics({topic: {"num_partitions": 2, "replication_factor": 1}})
        admin.wait_for_topics([topic], timeout_ms=30_000)

        producer = KafkaProducer(
            bootstrap_servers=kafka_bootstrap,
            acks="all",
            linger_ms=5,
        )
        sent: dict[str, list[int]] = defaultdict(list)
        futures = []
        for i in range(n_messages):
            key = f"k{i % n_keys}"
            sent[key].append(i)
            value = json.dumps({"seq": i, "key": key}).encode()
            futures.append(producer.send(topic, key=key.encode(), value=value))
        producer.flush(timeout=30)
        partitions_written = {f.get(timeout=30).partition for f in futures}
        producer.close()
        assert partitions_written == {0, 1}, "10 keys should hash onto both partitions"

        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        received: dict[str, list[int]] = defaultdict(list)
        partition_of_key: dict[str, int] = {}
        count = 0
        deadline = time.monotonic() + 60
        try:
            while count < n_messages and time.monotonic() < deadline:
                batch = consumer.poll(timeout_ms=1000)
                for tp, records in batch.items():
                    for rec in records:
                        key, value = rec.key.decode(), json.loads(rec.value)
                        assert value["key"] == key
                        received[key].append(value["seq"])
                        # a key always lives on one partition
                        assert partition_of_key.setdefault(key, tp.partition) == tp.partition
                        count += 1
                if batch:
                    consumer.commit()
            # nothing beyond what we produced
            assert not any(consumer.poll(timeout_ms=500).values())
            tps = [TopicPartition(topic, p) for p in (0, 1)]
            end = consumer.end_offsets(tps)
            committed = {tp: consumer.committed(tp) for tp in tps}
        finally:
            consumer.close()

        assert count == n_messages
        assert received == sent  # same messages, and in send order for every key
        assert sum(end.values()) == n_messages
        assert committed == end, "manual commits must cover everything consumed"
    finally:
        try:
            admin.delete_topics([topic])
        finally:
            admin.close()


# ---------------------------------------------------------------- prometheus
def _targets_dir() -> Path:
    """Where file-SD target files go (services.sh writes it next to the address)."""
    env = os.environ.get("CODISTILL_TEST_PROMETHEUS_TARGETS_DIR")
    path = (
        Path(env)
        if env
        else Path((ROOT / ".services" / "prometheus.targets_dir").read_text().strip())
    )
    assert path.is_dir(), f"prometheus targets dir {path} does not exist"
    return path


def _query(prometheus_url: str, promql: str) -> list[dict]:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_file_sd_target(prometheus_url: str) -> None:
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    tag = uuid.uuid4().hex[:12]
    metric = f"codistill_itest_value_{tag}"
    registry = CollectorRegistry()
    Gauge(metric, "integration-test gauge", registry=registry).set(42.5)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)

    target_file = _targets_dir() / f"itest-{tag}.json"
    tmp = target_file.with_suffix(".tmp")  # not matched by *.json: no half-written reads
    tmp.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {"itest": tag}}]))
    tmp.rename(target_file)
    try:
        deadline = time.monotonic() + 30
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = _query(prometheus_url, metric)
            if result:
                break
            time.sleep(0.5)
        assert result, f"{metric} never showed up in Prometheus within 30 s"
        (sample,) = result
        assert float(sample["value"][1]) == 42.5
        assert sample["metric"]["job"] == "codistill"
        assert sample["metric"]["itest"] == tag
    finally:
        target_file.unlink(missing_ok=True)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---------------------------------------------------------------- deployment files
def test_docker_compose_file_is_valid() -> None:
    proc = subprocess.run(
        [_tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docker_compose_defines_the_stack() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "kafka", "prometheus", "grafana"} <= set(services)
    kafka_env = services["kafka"]["environment"]
    assert kafka_env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert (
        "broker" in kafka_env["KAFKA_PROCESS_ROLES"]
        and "controller" in kafka_env["KAFKA_PROCESS_ROLES"]
    )


def test_deploy_prometheus_config_is_valid() -> None:
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    proc = subprocess.run(
        [_tool("promtool"), "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = config.read_text()
    assert "codistill-trainer" in text and "codistill-server" in text
