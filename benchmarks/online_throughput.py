"""Online trainer throughput on real Kafka + Redis, beside the raw rates of its two services.

    python benchmarks/online_throughput.py            # ~20k events
    python benchmarks/online_throughput.py --quick    # ~2k events, for the test suite

One run reports, on the same data and machine:

* the trainer's end-to-end events/s (consume -> validate -> join -> batched label and
  text fetch -> update -> checkpoint -> commit), with a per-phase time breakdown;
* raw kafka-python consumption of the same topic (assign + poll, no processing);
* raw Redis ``MGET`` of the same soft-label keys (redis-py), and ``store.get_labels``
  (MGET + decoding) for comparison.

Data: real stdlib functions (docstring -> code, mined like ``tasks``), 20 candidates
per query, *synthetic* teacher scores (throughput does not depend on their values;
the learning tests use the real teacher). The stream comes from the seeded
click-model generator, 10 shown results per impression.
Writes benchmarks/results/online_throughput[-quick].json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.common import RESULTS, machine, service, write_result  # noqa: E402
from codistill.config import Settings, load_settings  # noqa: E402
from stores import open_store  # noqa: E402
from stores.base import SoftLabelRecord, VersionInfo  # noqa: E402
from streaming import open_stream  # noqa: E402
from streaming.generator import QuerySpec, generate_stream  # noqa: E402
from student.online import OnlineTrainer, OnlineTrainerConfig  # noqa: E402
from tasks.mine import mine  # noqa: E402
from tasks.packages import SMALL_STDLIB  # noqa: E402
from tasks.sources import stdlib_files  # noqa: E402

console = Console()
VERSION = "bench-synthetic"
DIM = 384


def corpus(n_queries: int, n_candidates: int, seed: int) -> tuple[list[QuerySpec], dict[str, str]]:
    """Real stdlib (docstring, function) pairs; each query gets its gold + random negatives."""
    pairs = mine(stdlib_files(SMALL_STDLIB), progress=False).pairs
    rng = random.Random(seed)
    rng.shuffle(pairs)
    texts = {p.cid: p.code for p in pairs}
    ids = list(texts)
    specs = []
    for p in pairs[:n_queries]:
        negatives = rng.sample([c for c in ids if c != p.cid], n_candidates - 1)
        cands = [p.cid, *negatives]
        rng.shuffle(cands)
        specs.append(QuerySpec(f"q{len(specs):06d}", p.summary, cands,
                               [1.0 if c == p.cid else 0.0 for c in cands]))
    return specs, texts


def fill_store(settings: Settings, specs: list[QuerySpec], texts: dict[str, str]) -> None:
    rng = np.random.default_rng(0)
    store = open_store(settings.resolved_store())
    try:
        store.begin_version(VersionInfo(teacher_version=VERSION, model="synthetic",
                                        logit_scale=20.0, dim=DIM))
        store.put_texts(texts)
        ids = sorted(texts)
        store.put_embeddings(VERSION, ids, rng.normal(size=(len(ids), DIM)).astype(np.float32))
        records = []
        for q in specs:
            scores = rng.uniform(0.1, 0.5, len(q.candidate_ids)).astype(np.float32)
            scores[int(np.argmax(q.relevance))] = 0.7
            records.append(SoftLabelRecord(
                query_id=q.query_id, teacher_version=VERSION, candidate_ids=list(q.candidate_ids),
                scores=scores, query_embedding=rng.normal(size=DIM).astype(np.float32),
                logit_scale=20.0))
        store.put_labels(records)
        store.complete_version(VERSION)
        store.set_current(VERSION)
    finally:
        store.close()


def asym_student(settings: Settings, specs: list[QuerySpec], texts: dict[str, str],
                 path: Path) -> Path:
    """An untrained ``asym-bow`` student (random table) on the synthetic version, saved."""
    from codistill.config import DistillConfig
    from codistill.ranking import RankingExample
    from student.asym import StoreCandidates
    from student.build import build_student

    examples = [RankingExample(query=q.query, query_id=q.query_id,
                               candidates=[texts[c] for c in q.candidate_ids],
                               candidate_ids=list(q.candidate_ids), labels=list(q.relevance))
                for q in specs]
    with open_store(settings.resolved_store()) as store:
        student = build_student(examples, VERSION, DistillConfig(init="random", dim=128),
                                teacher_dim=DIM, candidate_source=StoreCandidates(store, VERSION))
    student.save(path)
    return path


def trainer_row(summary: dict[str, Any], checkpoint_every: int) -> dict[str, Any]:
    return {
        "events": summary["events_this_run"],
        "batches": summary["batches"],
        "optimizer_steps": summary["optimizer_steps"],
        "checkpoints": summary["batches"] // checkpoint_every + 1,
        "loop_seconds": summary["loop_seconds"],
        "startup_seconds": round(summary["seconds"] - summary["loop_seconds"], 3),
        "events_per_s": summary["events_per_s"],
        "phase_seconds": summary["phase_seconds"],
        "label_hits": summary["counters"].get("label_hits", 0),
    }


def produce(settings: Settings, specs: list[QuerySpec], n_requests: int) -> dict[str, Any]:
    generated = generate_stream(specs, n_requests, seed=0, max_shown=10)
    with open_stream(settings.resolved_stream()) as stream:
        stream.ensure_topics()
        t0 = time.perf_counter()
        for m in generated.messages:
            stream.send(settings.stream.topic, m.key, m.value)
        stream.flush()
        seconds = time.perf_counter() - t0
    n = len(generated.messages)
    return {"messages": n, "seconds": round(seconds, 3), "messages_per_s": round(n / seconds, 1)}


def raw_kafka_consume(settings: Settings, expected: int) -> dict[str, Any]:
    """kafka-python alone: assign every partition, poll from the beginning to the end."""
    from kafka import KafkaConsumer, TopicPartition

    topic = settings.stream.topic
    consumer = KafkaConsumer(bootstrap_servers=settings.stream.bootstrap_servers.split(","),
                             enable_auto_commit=False, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        n, t0 = 0, time.perf_counter()
        while n < expected and time.perf_counter() - t0 < 120:
            for records in consumer.poll(timeout_ms=500, max_records=2000).values():
                n += len(records)
        seconds = time.perf_counter() - t0
    finally:
        consumer.close()
    return {"records": n, "seconds": round(seconds, 3), "records_per_s": round(n / seconds, 1)}


def raw_redis_mget(settings: Settings, specs: list[QuerySpec], batch: int,
                   rounds: int) -> dict[str, Any]:
    """redis-py MGET of the label keys, and the store's get_labels (MGET + decode)."""
    import redis

    s = settings.store
    client = redis.Redis.from_url(s.redis_url)
    keys = [k for k in client.scan_iter(f"{s.namespace}:{VERSION}:label:*", count=1000)]
    rng = random.Random(0)
    batches = [rng.sample(keys, min(batch, len(keys))) for _ in range(rounds)]
    t0 = time.perf_counter()
    for b in batches:
        client.mget(b)
    raw_s = time.perf_counter() - t0
    client.close()
    store = open_store(settings.resolved_store())
    qids = [q.query_id for q in specs]
    qbatches = [rng.sample(qids, min(batch, len(qids))) for _ in range(rounds)]
    t0 = time.perf_counter()
    for b in qbatches:
        store.get_labels(VERSION, b)
    store_s = time.perf_counter() - t0
    store.close()
    n = batch * rounds
    return {"keys_per_call": batch, "calls": rounds,
            "mget_keys_per_s": round(n / raw_s, 1), "get_labels_per_s": round(n / store_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (~2k events)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    n_requests = args.requests or (1000 if args.quick else 10000)
    n_queries = 300 if args.quick else 2000
    name = "online_throughput-quick" if args.quick else "online_throughput"
    specs, texts = corpus(n_queries, 20, seed=0)

    with service("kafka", "CODISTILL_TEST_KAFKA") as bootstrap, \
            service("redis", "CODISTILL_TEST_REDIS_URL") as redis_url, \
            tempfile.TemporaryDirectory(prefix="codistill-bench-") as home:
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        settings = load_settings(
            home=Path(home),
            store={"backend": "redis", "redis_url": redis_url, "namespace": ns},
            stream={"backend": "kafka", "bootstrap_servers": bootstrap, "topic": ns,
                    "dlq_topic": f"{ns}.dlq", "partitions": 4},
        )
        fill_store(settings, specs, texts)
        produced = produce(settings, specs, n_requests)
        kafka_rate = raw_kafka_consume(settings, produced["messages"])
        redis_rate = raw_redis_mget(settings, specs, batch=64, rounds=200 if args.quick else 1000)
        cfg = OnlineTrainerConfig(name="bench", batch_size=args.batch_size,
                                  checkpoint_every=args.checkpoint_every, until_end=True)
        with OnlineTrainer(settings, cfg) as trainer:
            summary = trainer.run()
        # the default student kind: query tower only, candidate vectors read from Redis
        warm = asym_student(settings, specs, texts, Path(home) / "asym")
        with OnlineTrainer(settings, cfg.model_copy(update={"name": "bench-asym",
                                                            "init_student": warm})) as trainer:
            asym_summary = trainer.run()
        _cleanup_redis(redis_url, ns)

    trainer_result = trainer_row(summary, args.checkpoint_every)
    asym_result = trainer_row(asym_summary, args.checkpoint_every)
    payload = {
        "machine": machine(),
        "config": {"requests": n_requests, "queries": n_queries, "candidates_per_query": 20,
                   "shown": 10, "partitions": 4, "batch_size": args.batch_size,
                   "checkpoint_every": args.checkpoint_every,
                   "student": {"dim": cfg.dim, "out_dim": cfg.out_dim, "max_vocab": cfg.max_vocab},
                   "teacher_scores": "synthetic (throughput only)"},
        "produce": produced,
        "kafka_raw_consume": kafka_rate,
        "redis_raw": redis_rate,
        "trainer": trainer_result,
        "trainer_asym_bow": {**asym_result, "student": "asym-bow, dim 128 -> 384, candidate "
                             "vectors from Redis"},
    }
    path = write_result(name, payload, args.out or RESULTS / f"{name}.json")

    table = Table(title=f"online trainer throughput ({n_requests} requests, "
                        f"{produced['messages']} events)")
    table.add_column("what")
    table.add_column("rate", justify="right")
    table.add_row("kafka-python raw consume", f"{kafka_rate['records_per_s']:,.0f} records/s")
    table.add_row("redis-py raw MGET (64 keys/call)", f"{redis_rate['mget_keys_per_s']:,.0f} keys/s")
    table.add_row("store.get_labels (MGET + decode)", f"{redis_rate['get_labels_per_s']:,.0f} labels/s")
    table.add_row("trainer end to end (bow)", f"{trainer_result['events_per_s']:,.0f} events/s")
    table.add_row("trainer end to end (asym-bow)",
                  f"{asym_result['events_per_s']:,.0f} events/s")
    for phase, seconds in summary["phase_seconds"].items():
        share = seconds / max(summary["loop_seconds"], 1e-9)
        table.add_row(f"  trainer: {phase}", f"{seconds:.2f} s ({share:.0%})")
    console.print(table)
    console.print(f"wrote {path}")


def _cleanup_redis(url: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.unlink(*keys[i : i + 1000])
    client.close()


if __name__ == "__main__":
    main()
