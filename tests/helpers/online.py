"""Shared builders for the online-trainer tests and benchmark: a tiny store + a seeded stream.

The fast tests use a small hand-written code corpus with *synthetic* teacher
scores (the gold function scores highest, the rest are seeded noise), written
into a real store exactly as ``teacher.precompute`` would, and a stream from the
seeded click-model generator written into a real event log. The learning test
uses the real MiniLM teacher instead (see ``tests/test_online_trainer.py``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from codistill.config import Settings
from codistill.ids import candidate_id, query_id
from stores.base import SoftLabelRecord, Store, VersionInfo
from streaming.base import EventStream, Record
from streaming.events import Feedback, Impression
from streaming.generator import ClickModel, GeneratedStream, QuerySpec, generate_stream

ROOT = Path(__file__).resolve().parents[2]
VERSION = "tv-synthetic-1"
DIM = 8

FUNCTIONS: dict[str, str] = {
    "add two numbers and return the sum": "def add(a, b):\n    return a + b",
    "read a text file and return its contents":
        "def read_text(path):\n    with open(path, encoding='utf-8') as fh:\n        return fh.read()",
    "sort items in descending order": "def sort_desc(items):\n    return sorted(items, reverse=True)",
    "create a directory if it does not exist":
        "def ensure_dir(path):\n    os.makedirs(path, exist_ok=True)\n    return path",
    "parse a json file": "def load_json(path):\n    with open(path) as fh:\n        return json.load(fh)",
    "convert a string to upper case": "def shout(text):\n    return text.strip().upper()",
    "count the words in a sentence": "def word_count(sentence):\n    return len(sentence.split())",
    "compute the mean of a list of numbers":
        "def mean(values):\n    values = list(values)\n    return sum(values) / len(values)",
    "check whether a number is prime":
        "def is_prime(n):\n    return n > 1 and all(n % k for k in range(2, int(n ** 0.5) + 1))",
    "reverse a string": "def reverse(text):\n    return text[::-1]",
    "remove duplicate items keeping order":
        "def unique(items):\n    return list(dict.fromkeys(items))",
    "flatten a nested list":
        "def flatten(nested):\n    return [x for sub in nested for x in sub]",
    "download a web page over http":
        "def fetch(url):\n    with urllib.request.urlopen(url) as resp:\n        return resp.read()",
    "compute the sha256 hash of a file":
        "def sha256_file(path):\n    h = hashlib.sha256()\n    h.update(Path(path).read_bytes())\n"
        "    return h.hexdigest()",
    "merge two dictionaries": "def merge(a, b):\n    out = dict(a)\n    out.update(b)\n    return out",
    "get the current time as an iso string":
        "def now_iso():\n    return datetime.now(timezone.utc).isoformat()",
}


@dataclass(frozen=True)
class Corpus:
    queries: list[QuerySpec]
    texts: dict[str, str]  # candidate id -> code
    gold: dict[str, str]  # query id -> gold candidate id


def tiny_corpus(n_candidates: int = 8) -> Corpus:
    """Each query: its function (relevance 1) + ``n_candidates - 1`` others, fixed order."""
    codes = list(FUNCTIONS.values())
    ids = [candidate_id(c) for c in codes]
    queries = []
    gold = {}
    for i, q in enumerate(FUNCTIONS):
        cands = [ids[(i + k) % len(ids)] for k in range(n_candidates)]
        queries.append(QuerySpec(query_id(q), q, cands, [1.0] + [0.0] * (n_candidates - 1)))
        gold[query_id(q)] = ids[i]
    return Corpus(queries, dict(zip(ids, codes, strict=True)), gold)


def synthetic_records(corpus: Corpus, version: str = VERSION, seed: int = 0,
                      logit_scale: float = 20.0) -> list[SoftLabelRecord]:
    """Teacher-like records: the gold candidate's cosine ~0.7, the others 0.1-0.5."""
    rng = np.random.default_rng(seed)
    out = []
    for q in corpus.queries:
        scores = rng.uniform(0.1, 0.5, len(q.candidate_ids)).astype(np.float32)
        scores[list(q.candidate_ids).index(corpus.gold[q.query_id])] = 0.7
        out.append(SoftLabelRecord(
            query_id=q.query_id, teacher_version=version, candidate_ids=list(q.candidate_ids),
            scores=scores, query_embedding=rng.normal(size=DIM).astype(np.float32),
            logit_scale=logit_scale,
        ))
    return out


def fill_store(store: Store, corpus: Corpus, version: str = VERSION,
               records: Sequence[SoftLabelRecord] | None = None,
               skip_labels: Sequence[str] = (), complete: bool = True) -> None:
    """Write texts, embeddings, labels (minus ``skip_labels`` query ids) and the manifest."""
    store.begin_version(VersionInfo(teacher_version=version, model="synthetic",
                                    logit_scale=20.0, dim=DIM, embedding_dtype="float32"))
    store.put_texts(corpus.texts)
    ids = sorted(corpus.texts)
    emb = np.random.default_rng(1).normal(size=(len(ids), DIM)).astype(np.float32)
    store.put_embeddings(version, ids, emb)
    records = list(records) if records is not None else synthetic_records(corpus, version)
    store.put_labels([r for r in records if r.query_id not in set(skip_labels)])
    if complete:
        store.complete_version(version)
        store.set_current(version)


def make_stream(corpus: Corpus, n_requests: int, seed: int = 0, malformed_rate: float = 0.0,
                **kwargs: Any) -> GeneratedStream:
    kwargs.setdefault("max_feedback_delay_s", 20.0)
    kwargs.setdefault("max_delivery_delay_s", 3.0)
    return generate_stream(corpus.queries, n_requests, seed, malformed_rate=malformed_rate,
                           **kwargs)


def produce(stream: EventStream, topic: str, generated: GeneratedStream) -> None:
    for m in generated.messages:
        stream.send(topic, m.key, m.value)
    stream.flush()


def produce_live(stream: EventStream, topic: str, generated: GeneratedStream, step: int,
                 pause_s: float) -> None:
    """A live producer: ``step`` messages at a time, flushed, then ``pause_s`` of quiet."""
    import time

    for i in range(0, len(generated.messages), step):
        for m in generated.messages[i:i + step]:
            stream.send(topic, m.key, m.value)
        stream.flush()
        time.sleep(pause_s)


def read_topic(stream: EventStream, topic: str, batch: int = 1000) -> list[Record]:
    """Every record of ``topic``, partition by partition."""
    out: list[Record] = []
    for p in stream.partitions(topic):
        offset = 0
        while records := stream.read(topic, p, offset, batch):
            out += records
            offset = records[-1].offset + 1
    return out


def end_offsets(stream: EventStream, topic: str) -> dict[str, int]:
    return {str(p): stream.end_offset(topic, p) for p in stream.partitions(topic)}


# -- the trainer as a subprocess ------------------------------------------------------------
def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a child process load the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODISTILL_")}
    s = settings
    env.update({
        "CODISTILL_HOME": str(s.home),
        "CODISTILL_THREADS": "1",
        "CODISTILL_STORE__BACKEND": s.store.backend,
        "CODISTILL_STORE__REDIS_URL": s.store.redis_url,
        "CODISTILL_STORE__NAMESPACE": s.store.namespace,
        "CODISTILL_STREAM__BACKEND": s.stream.backend,
        "CODISTILL_STREAM__BOOTSTRAP_SERVERS": s.stream.bootstrap_servers,
        "CODISTILL_STREAM__TOPIC": s.stream.topic,
        "CODISTILL_STREAM__DLQ_TOPIC": s.stream.dlq_topic,
        "CODISTILL_STREAM__PARTITIONS": str(s.stream.partitions),
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


@dataclass
class TrainerRun:
    returncode: int
    summary: dict[str, Any] | None
    log: str

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def start_trainer(settings: Settings, trainer: Mapping[str, Any], crash_at: str = "",
                  log_path: Path | None = None) -> subprocess.Popen[bytes]:
    env = settings_env(settings)
    if crash_at:
        env["CODISTILL_TRAINER_CRASH_AT"] = crash_at
    out = open(log_path or os.devnull, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "student.online", "--trainer", json.dumps(dict(trainer))],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=out,
        )
    finally:
        out.close()


def finish(proc: subprocess.Popen[bytes], log_path: Path | None, timeout: float = 300) -> TrainerRun:
    stdout, _ = proc.communicate(timeout=timeout)
    lines = [ln for ln in stdout.decode().splitlines() if ln.startswith("{")]
    summary = json.loads(lines[-1]) if lines and proc.returncode == 0 else None
    log = log_path.read_text() if log_path and log_path.exists() else ""
    return TrainerRun(proc.returncode, summary, log)


def run_trainer(settings: Settings, trainer: Mapping[str, Any], crash_at: str = "",
                log_path: Path | None = None, kill_after_s: float | None = None,
                timeout: float = 300) -> TrainerRun:
    """Run ``python -m student.online`` to its end, its crash hook, or a SIGKILL after a delay."""
    proc = start_trainer(settings, trainer, crash_at, log_path)
    if kill_after_s is not None:
        try:
            proc.wait(kill_after_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    return finish(proc, log_path, timeout)


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def student_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def assert_same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs (max |diff| "\
            f"{(a[name].float() - b[name].float()).abs().max().item():.3g})"


def seeded_kill_delays(seed: int, n: int, lo: float, hi: float) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(lo, hi), 2) for _ in range(n)]


# -- position-biased clicks from a biased logging ranker --------------------------------------
def biased_click_messages(
    examples: Sequence[Any], n_requests: int, seed: int, *, click_model: ClickModel,
    max_shown: int = 20, decoy_boost: float = 1.0, noise: float = 0.5, n_decoys: int = 16,
    others: float = 0.0,
) -> list[tuple[str, bytes]]:
    """``(key, value)`` messages of a stream logged by a *biased* ranker, in delivery order.

    The logging ranker (a stale production model) prefers each query's BM25 hard
    negatives - lexically close but wrong functions (``meta.hard_negative_ids``) -
    by ``decoy_boost`` over the gold and the random negatives, plus Gaussian noise
    per impression. Users click under the position-based model of ``click_model``
    (examined with probability ``(1/rank)^eta``). A naive click loss then learns the
    logger's preference for decoys, since they sit where users look; inverse
    propensity weighting undoes the position effect.
    """
    rng = random.Random(seed)
    t = datetime(2026, 1, 1, tzinfo=UTC)
    timed: list[tuple[datetime, int, str, bytes]] = []
    for i in range(n_requests):
        ex = examples[rng.randrange(len(examples))]
        decoys = set(ex.meta.get("hard_negative_ids", [])[:n_decoys])
        gold = {c for c, label in zip(ex.candidate_ids, ex.labels, strict=True) if label > 0}
        score = {c: (decoy_boost if c in decoys else 0.0 if c in gold else others)
                 + rng.gauss(0.0, noise) for c in ex.candidate_ids}
        shown = sorted(ex.candidate_ids, key=lambda c: -score[c])[:max_shown]
        relevant = dict(zip(ex.candidate_ids, ex.labels, strict=True))
        t += timedelta(seconds=rng.expovariate(1.0))
        rid = f"b{seed}-{i:06d}"
        imp = Impression(request_id=rid, query_id=ex.query_id, query=ex.query,
                         candidate_ids=shown, model_version="logger", event_time=t)
        timed.append((t, len(timed), rid, imp.to_bytes()))
        for rank, cid in enumerate(shown, start=1):
            if rng.random() < click_model.p_click(rank, relevant[cid] > 0):
                tc = t + timedelta(seconds=rng.uniform(0.5, 10.0))
                fb = Feedback(request_id=rid, candidate_id=cid, action="click", position=rank,
                              event_time=tc)
                timed.append((tc, len(timed), rid, fb.to_bytes()))
    timed.sort(key=lambda x: (x[0], x[1]))
    return [(key, value) for _, _, key, value in timed]


# -- the trainer in-process, on an embedded store + log under one home -----------------------
SMALL = {"dim": 16, "out_dim": 16, "max_vocab": 512, "lr": 0.01}


def online_settings(home: Path) -> Settings:
    from codistill.config import load_settings

    return load_settings(home=home, threads=1)


def setup_online(home: Path, n_requests: int, seed: int = 0, malformed_rate: float = 0.0,
                 skip_labels: tuple[str, ...] = ()) -> tuple[Settings, GeneratedStream]:
    """Store + stream under ``home``; returns the settings and the generated stream."""
    from stores import open_store
    from streaming import open_stream

    settings = online_settings(home)
    corpus = tiny_corpus()
    with open_store(settings.resolved_store()) as store:
        fill_store(store, corpus, skip_labels=skip_labels)
    generated = make_stream(corpus, n_requests, seed, malformed_rate)
    with open_stream(settings.resolved_stream()) as stream:
        stream.ensure_topics()
        produce(stream, settings.stream.topic, generated)
    return settings, generated


# A small trainer: batches of 16, a checkpoint every 3, ``until_end`` (JSON-ready, so a
# trainer subprocess can take it too).
TRAINER = {"batch_size": 16, "checkpoint_every": 3, "until_end": True, **SMALL}


def trainer_config(**kw: Any) -> Any:
    """:data:`TRAINER` as an ``OnlineTrainerConfig``; ``kw`` overrides."""
    from codistill.config import OnlineTrainerConfig

    return OnlineTrainerConfig.model_validate({**TRAINER, **kw})


def kafka_redis_settings(home: Path, bootstrap: str, redis_url: str, prefix: str,
                         partitions: int) -> Settings:
    """Settings on a real Kafka and Redis, with a fresh topic and namespace per call."""
    from codistill.config import load_settings

    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    return load_settings(
        home=home, threads=1,
        store={"backend": "redis", "redis_url": redis_url, "namespace": name},
        stream={"backend": "kafka", "bootstrap_servers": bootstrap, "topic": name,
                "dlq_topic": f"{name}.dlq", "partitions": partitions},
    )


def run_in_process(settings: Settings, **kw: Any) -> tuple[dict[str, Any], Any]:
    """Run :func:`trainer_config` ``(**kw)`` to its end; the summary and the (closed) trainer."""
    from student.online import OnlineTrainer

    trainer = OnlineTrainer(settings, trainer_config(**kw))
    try:
        return trainer.run(), trainer
    finally:
        trainer.close()


def waiting_offsets(partitions: Sequence[int], ends: Mapping[int, int],
                    batch_size: int) -> dict[str, int]:
    """Where a live trainer (full batches only) stops to wait for data on a log with ``ends``."""
    from student.online.plan import decide
    from student.online.schedule import Wait

    offsets, turn = dict.fromkeys(partitions, 0), 0
    while not isinstance(step := decide(partitions, offsets, ends, turn, batch_size), Wait):
        offsets[step.partition], turn = step.end, step.next_turn
    return {str(p): o for p, o in offsets.items()}


def committed_offsets(stream: EventStream, group: str, topic: str) -> dict[str, int]:
    """The group's committed offsets (0 where none)."""
    return {str(p): stream.committed(group, topic, p) or 0 for p in stream.partitions(topic)}


def run_in_thread(trainer: Any) -> tuple[threading.Thread, list[BaseException]]:
    """Start ``trainer.run()`` on a daemon thread; what it raises lands in the list."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            trainer.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors
