"""Serving benchmark: what the distilled student costs per request, next to its teacher.

    python benchmarks/serving.py                      # demo size, home artifacts/bench-serving
    python benchmarks/serving.py --home artifacts     # the demo's home, its student and teacher
    python benchmarks/serving.py --report --markdown  # the last result's tables, for the README
    python benchmarks/serving.py --quick --home H     # seconds (small data; the test suite)

Three systems rank the same requests (a validation query and the first 20 of its
candidates, by id; ``top_k`` 10), each behind its own HTTP server on 127.0.0.1
(uvicorn in a thread of this process, ``POST /v1/rank`` with the server's request
and response schemas):

* **student (ONNX)**: the real server (``serving.commands.build_server`` +
  ``serving.app.create_app``) on the student's fp32 bundle, events off
  (``serving.emit_events = False``: the broker is not measured; everything else a
  request does, validation, metrics, the impression memory, is);
* **student (torch)**: the registry's torch ``Student`` in a minimal FastAPI app;
* **teacher (ONNX)**: the teacher the student was distilled from, exported to ONNX
  (``teacher.onnx``: mean pooling and L2 normalisation in the graph, checked against
  its own ``encode``), the query encoded by that graph at the teacher's length.

All three use the same threads (``serving.threads``, default 1; torch gets as many)
and the candidate vectors come from memory: the same preloaded ``VectorCache`` of
the teacher's stored vectors (the real server's own cache is preloaded with the
same vectors), so only the query encoder differs between systems.

Measured:

* **load**: a fixed number of requests at concurrency 1, 4 and 16 (closed loop:
  that many client threads, each with its own keep-alive ``http.client``
  connection, sending the next request when the last one answered); req/s, p50 /
  p95 / p99 latency and errors (a non-200, a transport error or a wrong number of
  results). The clients share this process and its GIL with the servers, the same
  for every system, so req/s at 16 is a lower bound;
* **in process**: ``rank(1 query, 20 candidates)`` without HTTP (cache lookup,
  query encode, scores, top-k sort), the three systems in rotating blocks of 50
  calls (warm caches for each, background load drifting over all alike); p50 / p99;
* **floors** (reported as pass / fail, not asserted): teacher / student p50 in
  process >= 100x, student p99 in process <= 2 ms, and the HTTP path (server p50 at
  concurrency 1 minus in-process p50) <= 2 ms;
* **hot swap**: one load run at concurrency 4 while the main thread promotes the
  student's fp32 and int8 bundles in turn every 2 s (``ModelHost.promote``, the
  first one a real load, warm-up and probe); requests, errors, versions seen. The
  home's serving pointer is restored afterwards;
* **fallback**: test MRR@10 of the bundle with 0 / 25 / 50% of every list's
  candidates forced unknown (a seeded choice; those take the bundle's fallback,
  ``serving.vectors.example_scores`` with a cache that lacks them: encoded from
  their text by the query graph), with BM25 and the ONNX teacher on the same lists.

Without ``--home`` (or with ``--build``) the home is built like
``benchmarks/student.py`` does: data, the current teacher, precompute, the default
``asym-bow`` student with the default recipe and no wall-clock cap; what exists is
reused. With ``--home`` the home's current student is measured as it is. Either way
its fp32 and int8 bundles are exported when missing, and the teacher's ONNX graph is
cached in ``HOME/serving/teacher-onnx/<teacher version>/``. Writes
``benchmarks/results/serving-<size>.json`` (``serving-quick.json`` with ``--quick``);
``--markdown`` prints the README tables.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import itertools
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not __package__:  # run as a script, this folder would be sys.path[0] (and this file
    # would shadow the `serving` package): put the repository root there
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.common import RESULTS, machine, write_result  # noqa: E402
from codistill.config import Settings, load_settings  # noqa: E402
from codistill.ranking import RankingExample  # noqa: E402
from serving.schemas import RankedItem, RankRequest, RankResponse  # noqa: E402

console = Console()

SYSTEMS = {"student-onnx": "student (ONNX)", "student-torch": "student (torch)",
           "teacher-onnx": "teacher (ONNX)"}
LEVELS = (1, 4, 16)
FRACTIONS = (0.0, 0.25, 0.5)
CANDIDATES = 20
TOP_K = 10
FLOORS = {"ratio": 100.0, "student_p99_ms": 2.0, "http_ms": 2.0}


@dataclass(frozen=True)
class Plan:
    """How much to measure (the full run, or ``--quick`` for the test suite)."""

    requests: int  # per system and concurrency level
    rank_calls: int  # in-process calls per system
    swap_seconds: float
    swap_interval_s: float
    warmup: int = 20

    @classmethod
    def make(cls, quick: bool, args: argparse.Namespace) -> Plan:
        base = cls(24, 60, 1.5, 0.3, 4) if quick else cls(2000, 2000, 20.0, 2.0)
        return cls(args.requests or base.requests, args.rank_calls or base.rank_calls,
                   args.swap_seconds or base.swap_seconds,
                   args.swap_interval or base.swap_interval_s, base.warmup)


# -- the home ----------------------------------------------------------------------------
def prepare_home(settings: Settings, build: bool) -> dict[str, Any]:
    """The current student, its teacher and its fp32 / int8 bundles (built when missing)."""
    from codistill.app.export import export_bundle
    from serving.bundle import BundleRegistry
    from stores import open_configured_store
    from student.registry import student_registry
    from tasks import dataset as ds
    from teacher import workflow as wf

    reg = student_registry(settings.home)
    if build:
        from codistill.config import DistillConfig
        from student.distill import distill
        from tasks.build import build_dataset

        build_dataset(settings.data, settings.data_dir, settings.download_dir, progress=True)
        teacher = wf.ensure_current(settings)
        wf.precompute_version(settings, teacher, {sp: ds.read_split(settings, sp)
                                                  for sp in ds.SPLITS}, progress=True)
        cfg = DistillConfig(time_budget_s=1e9)  # the default recipe, no wall-clock cap
        current = reg.current_version()
        card = reg.load_card(current) if current is not None else None
        if card is None or (card.teacher_version, card.data_hash, card.recipe) != (
                teacher, ds.manifest_data_hash(settings), cfg.recipe()):
            console.rule("distil the default student")
            distill(settings, cfg, progress=True, set_current=True)
    student = reg.current_version()
    if student is None:
        raise SystemExit(f"no current student under {settings.home}/students: run the demo, "
                         "or omit --home to build the benchmark's own home")
    card = reg.load_card(student)
    bundles = BundleRegistry(settings.bundles_dir)
    found: dict[str, str] = {}
    for version in bundles.versions():  # oldest first: the newest match wins
        bcard = bundles.load_card(version)
        if bcard.student_version == student:
            found[bcard.precision] = version
    missing = [p for p in ("fp32", "int8") if p not in found]
    if missing:
        store = open_configured_store(settings)
        try:
            for precision in missing:
                console.print(f"exporting the {precision} bundle of {student}")
                found[precision] = export_bundle(settings, store, student,
                                                 precision=precision).bundle_version
        finally:
            store.close()
    return {"student": student, "kind": card.kind, "teacher": card.teacher_version,
            "student_data_hash": card.data_hash, "data_hash": ds.manifest_data_hash(settings),
            "bundles": found}


def teacher_graph(settings: Settings, version: str, sample: Sequence[str]) -> tuple[Path, Any]:
    """``HOME/serving/teacher-onnx/<version>/``, exported (and checked) unless it exists."""
    from teacher import workflow as wf
    from teacher.onnx import export_teacher_onnx, load_teacher_onnx_card

    folder = settings.home / "serving" / "teacher-onnx" / version
    card = load_teacher_onnx_card(folder)
    if card is None or card.teacher_version != version:
        console.print(f"exporting teacher {version} to ONNX")
        teacher = wf.open_teacher(settings, version, progress=False)
        model_dir = wf.teacher_registry(settings).model_dir(teacher.card)
        card = export_teacher_onnx(teacher, model_dir, folder, sample)
        del teacher
        gc.collect()
    return folder, card


# -- the three rankers -------------------------------------------------------------------
class TeacherRanker:
    """The teacher's ONNX graph on ONNX Runtime with the serving session options."""

    def __init__(self, folder: Path, card: Any, threads: int, graph_level: str) -> None:
        import onnxruntime as ort

        from serving.runtime import session_options
        from teacher.onnx import TEACHER_ONNX_FILE, TEACHER_TOKENIZER_FILE, TeacherTokenizer

        self.card, self.version = card, card.teacher_version
        self.session = ort.InferenceSession(str(folder / TEACHER_ONNX_FILE),
                                            session_options(threads, graph_level),  # type: ignore[arg-type]
                                            providers=["CPUExecutionProvider"])
        self.tokenizer = TeacherTokenizer(folder / TEACHER_TOKENIZER_FILE)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        ids, mask = self.tokenizer.encode(texts, self.card.max_seq_length)
        return self.session.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})[0]

    def scores(self, q: np.ndarray, c: np.ndarray) -> np.ndarray:
        """``logit_scale * cosine``, as the bundle scores (stored vectors may be float16)."""
        from serving.runtime import normalize

        return (self.card.logit_scale * (normalize(c) @ normalize(q))).astype(np.float32)


Rank = Callable[[str, Sequence[str]], np.ndarray]  # (query, ids) -> scores, by id order


def rankers(student_onnx: Any, student_torch: Any, teacher: TeacherRanker,
            cache: Any) -> dict[str, Rank]:
    """``rank(query, ids) -> scores`` per system; vectors from the one shared cache."""
    import torch

    def vectors(ids: Sequence[str]) -> np.ndarray:
        c, found, *_ = cache.get(ids)
        if c is None or not found.all():
            raise KeyError(f"{int((~found).sum())} of {len(ids)} candidates not in the cache")
        return c

    def onnx_student(query: str, ids: Sequence[str]) -> np.ndarray:
        c = vectors(ids)
        return student_onnx.scores(student_onnx.embed_queries([query])[0], c)

    @torch.inference_mode()
    def torch_student(query: str, ids: Sequence[str]) -> np.ndarray:
        c = torch.from_numpy(vectors(ids))
        q = student_torch.encode_queries([query])
        return student_torch.score_embeddings(q, c)[0].numpy()

    def onnx_teacher(query: str, ids: Sequence[str]) -> np.ndarray:
        c = vectors(ids)
        return teacher.scores(teacher.embed_queries([query])[0], c)

    return {"student-onnx": onnx_student, "student-torch": torch_student,
            "teacher-onnx": onnx_teacher}


def top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:k]


def minimal_app(rank: Rank, version: str) -> Any:
    """A FastAPI app with the server's ``/v1/rank`` schemas around one ranker (ids only).

    The schemas are imported at module level: FastAPI resolves the route's (string)
    annotations in this module's globals.
    """
    from fastapi import FastAPI, HTTPException

    app = FastAPI()

    @app.post("/v1/rank", response_model=RankResponse)
    def rank_route(req: RankRequest) -> RankResponse:
        ids = [c.id for c in req.candidates]
        if any(i is None for i in ids):
            raise HTTPException(422, "this benchmark server ranks by id only")
        try:
            scores = rank(req.query, ids)  # type: ignore[arg-type]
        except KeyError as exc:
            raise HTTPException(422, str(exc)) from None
        order = top(scores, min(req.top_k or TOP_K, len(ids)))
        return RankResponse(request_id=uuid.uuid4().hex, model_version=version,
                            results=[RankedItem(id=ids[i] or "", score=float(scores[i]),
                                                rank=r + 1) for r, i in enumerate(order)])

    return app


@contextmanager
def http_server(app: Any) -> Iterator[int]:
    """uvicorn on 127.0.0.1 in a daemon thread, on a socket bound here; yields the port."""
    import uvicorn

    # proto IPPROTO_TCP, as uvicorn's own bind: asyncio sets TCP_NODELAY on accepted
    # sockets only then (without it a response's header and body writes meet the
    # client's delayed ACK: 40 ms per request)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                        access_log=False))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    if not web.started:
        raise RuntimeError("the HTTP server did not start within 30 s")
    try:
        yield port
    finally:
        web.should_exit = True
        thread.join(10)
        sock.close()


# -- load ----------------------------------------------------------------------------------
HEADERS = {"Content-Type": "application/json"}


def payloads(examples: Sequence[RankingExample]) -> tuple[list[bytes], list[tuple[str, list[str]]]]:
    """One request body per distinct query (its first ``CANDIDATES`` candidates, by id)."""
    seen: set[str] = set()
    pairs = []
    for ex in examples:
        if ex.query in seen:
            continue
        seen.add(ex.query)
        pairs.append((ex.query, list(ex.candidate_ids[:CANDIDATES])))
    bodies = [json.dumps({"query": q, "candidates": [{"id": i} for i in ids],
                          "top_k": TOP_K}).encode() for q, ids in pairs]
    return bodies, pairs


def load_run(port: int, bodies: Sequence[bytes], expect: Sequence[int], concurrency: int,
             requests: int | None = None, stop: threading.Event | None = None
             ) -> dict[str, Any]:
    """``requests`` requests (or until ``stop``) from ``concurrency`` keep-alive clients.

    Request ``i`` sends ``bodies[i % len(bodies)]``; an answer counts as correct only
    with status 200 and ``expect[i % len]`` results. Latency is send -> body read.
    """
    counter = itertools.count()  # next() is atomic under the GIL
    latencies: list[float] = []
    errors: list[str] = []
    versions: Counter[str] = Counter()
    start = threading.Barrier(concurrency + 1)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine: list[float] = []
        start.wait()
        while True:
            if stop is not None and stop.is_set():
                break
            i = next(counter)
            if requests is not None and i >= requests:
                break
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/rank", body, HEADERS)
                resp = conn.getresponse()
                data = resp.read()
                dt = time.perf_counter() - t0
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}: {data[:200]!r}")
                    continue
                out = json.loads(data)
                if len(out["results"]) != expect[i % len(expect)]:
                    errors.append(f"{len(out['results'])} results, expected "
                                  f"{expect[i % len(expect)]}")
                    continue
                versions[out["model_version"]] += 1
                mine.append(dt)
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.close()
        latencies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {**latency_stats(latencies), "concurrency": concurrency,
            "requests": len(latencies) + len(errors), "ok": len(latencies),
            "errors": len(errors), "error_examples": errors[:5], "seconds": wall,
            "req_per_s": len(latencies) / wall if wall > 0 else 0.0,
            "versions": dict(versions)}


def latency_stats(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    ms = np.asarray(seconds) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max())}


def in_process(ranks: dict[str, Rank], pairs: Sequence[tuple[str, list[str]]], calls: int,
               warmup: int, block: int = 50) -> dict[str, dict[str, Any]]:
    """``rank(1 query, 20 candidates)`` + top-k, per system, in rotating blocks.

    Each system runs ``block`` consecutive calls (its caches warm, as in a server that
    serves only it), then the next system: background load drifts over all of them
    alike. Every system sees the same queries in the same order.
    """
    times: dict[str, list[float]] = {name: [] for name in ranks}
    for i in range(warmup):
        for rank in ranks.values():
            top(rank(*pairs[i % len(pairs)]), TOP_K)
    bar = tqdm(total=calls * len(ranks), desc="rank in process", unit="call")
    for start in range(0, calls, block):
        for name, rank in ranks.items():
            for i in range(start, min(calls, start + block)):
                query, ids = pairs[i % len(pairs)]
                t0 = time.perf_counter()
                top(rank(query, ids), TOP_K)
                times[name].append(time.perf_counter() - t0)
            bar.update(min(calls, start + block) - start)
    bar.close()
    return {name: {**latency_stats(ts), "calls": len(ts)} for name, ts in times.items()}


def swap_run(server: Any, port: int, bodies: Sequence[bytes], expect: Sequence[int],
             versions: Sequence[str], seconds: float, interval: float) -> dict[str, Any]:
    """Load at concurrency 4 while the main thread promotes ``versions`` in turn."""
    from serving.bundle import BundleError

    refused: list[str] = []
    stop = threading.Event()
    out: dict[str, Any] = {}
    loader = threading.Thread(target=lambda: out.update(
        load_run(port, bodies, expect, 4, stop=stop)), daemon=True)
    loader.start()
    swaps, swap_ms = 0, []
    deadline = time.monotonic() + seconds
    try:
        for version in itertools.cycle(versions):
            wait = min(interval, deadline - time.monotonic())
            if wait <= 0:
                break
            time.sleep(wait)
            if time.monotonic() >= deadline:
                break
            t0 = time.perf_counter()
            try:
                server.host.promote(version, reason="benchmarks/serving.py swap run")
            except BundleError as exc:  # a refused swap keeps the old bundle serving
                refused.append(str(exc))
                continue
            swap_ms.append((time.perf_counter() - t0) * 1000)
            swaps += 1
    finally:
        stop.set()
        loader.join(60)
    return {**out, "swaps": swaps, "refused": refused, "swap_interval_s": interval,
            "planned_seconds": seconds, "promote_ms": swap_ms,
            "versions_seen": sorted(out.get("versions", {}))}


# -- fallback ----------------------------------------------------------------------------
def fallback_rows(ranker: Any, vecs: dict[str, np.ndarray], teacher_version: str,
                  examples: Sequence[RankingExample], seed: int) -> list[dict[str, Any]]:
    """Test metrics of the bundle with a share of every list's candidates unknown."""
    from codistill.metrics import evaluate
    from serving.vectors import VectorCache, example_scores

    rows = []
    for frac in FRACTIONS:
        rng = np.random.default_rng([seed, round(frac * 100)])
        scores, fallbacks, candidates = [], 0, 0
        for ex in tqdm(examples, desc=f"fallback {frac:.0%}", unit="list", leave=False):
            n = len(ex.candidate_ids)
            unknown = set(rng.choice(n, size=round(frac * n), replace=False).tolist())
            known = [cid for i, cid in enumerate(ex.candidate_ids) if i not in unknown]
            cache = VectorCache(None, teacher_version, capacity=max(1, n))
            if known:
                cache.put(known, np.stack([vecs[c] for c in known]))
            s, used = example_scores(ranker, cache, ex)
            scores.append(s)
            fallbacks += used
            candidates += n
        result = evaluate(scores, [ex.labels for ex in examples])
        rows.append({"unknown_share": frac, **result, "fallbacks": fallbacks,
                     "candidates": candidates})
    return rows


def teacher_metrics(teacher: TeacherRanker, vecs: dict[str, np.ndarray],
                    examples: Sequence[RankingExample]) -> dict[str, float]:
    from codistill.metrics import evaluate

    q = np.concatenate([teacher.embed_queries([ex.query for ex in examples[i:i + 32]])
                        for i in range(0, len(examples), 32)])
    scores = [teacher.scores(q[n], np.stack([vecs[c] for c in ex.candidate_ids]))
              for n, ex in enumerate(examples)]
    return evaluate(scores, [ex.labels for ex in examples])


# -- tables ------------------------------------------------------------------------------
def _ms(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def tables(r: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table; rendered by rich and as markdown."""
    out = []
    rows = []
    for level in r["settings"]["concurrency"]:
        for key, label in SYSTEMS.items():
            s = r["load"][key][str(level)]
            rows.append([label, str(level), str(s["requests"]), str(s["errors"]),
                         f"{s['req_per_s']:.0f}", _ms(s["p50_ms"]), _ms(s["p95_ms"]),
                         _ms(s["p99_ms"])])
    out.append((f"HTTP on loopback ({r['settings']['candidates_per_request']} candidates, "
                f"top {TOP_K}, {r['settings']['threads']} thread(s))",
                ["system", "concurrency", "requests", "errors", "req/s", "p50 ms", "p95 ms",
                 "p99 ms"], rows))
    ip = r["in_process"]
    stud = ip["student-onnx"]["p50_ms"]
    rows = [[label, _ms(ip[key]["p50_ms"], 3), _ms(ip[key]["p99_ms"], 3),
             _ms(_ratio(ip[key]["p50_ms"], stud), 1) + "x",
             _ms(_minus(r["load"][key]["1"]["p50_ms"], ip[key]["p50_ms"]), 3)]
            for key, label in SYSTEMS.items()]
    out.append(("rank(1 query, 20 candidates) in process",
                ["system", "p50 ms", "p99 ms", "p50 / student (ONNX)", "HTTP adds at c=1, ms"],
                rows))
    rows = [[f["name"], f["measured"], f["target"], "pass" if f["pass"] else "FAIL"]
            for f in r["floors"]]
    out.append(("floors", ["floor", "measured", "target", "result"], rows))
    sw = r["swap"]
    out.append(("hot swap under load (concurrency 4)",
                ["seconds", "swaps", "refused", "requests", "errors", "versions seen", "p50 ms",
                 "p99 ms"],
                [[f"{sw['seconds']:.1f}", str(sw["swaps"]), str(len(sw.get("refused", []))),
                  str(sw["requests"]),
                  str(sw["errors"]), str(len(sw["versions_seen"])), _ms(sw["p50_ms"]),
                  _ms(sw["p99_ms"])]]))
    fb = r["fallback"]
    rows = [[f"bundle, {row['unknown_share']:.0%} unknown", f"{row['mrr@10']:.4f}",
             f"{row['ndcg@10']:.4f}", str(row["n_queries"]),
             f"{row['fallbacks']} / {row['candidates']}"] for row in fb["rows"]]
    for name in ("teacher", "bm25"):
        m = fb[name]
        rows.append([f"{'teacher (ONNX)' if name == 'teacher' else 'BM25'}, same lists",
                     f"{m['mrr@10']:.4f}", f"{m['ndcg@10']:.4f}", str(m["n_queries"]), ""])
    out.append(("test set, candidates forced unknown (fallback: the query graph)",
                ["ranker", "MRR@10", "NDCG@10", "queries", "fallbacks / candidates"], rows))
    return out


def show(r: dict[str, Any], markdown: bool) -> None:
    for title, header, rows in tables(r):
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if markdown:
        m, st = r["machine"], r["settings"]
        print(f"\nMeasured on {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, "
              f"Python {m['python']}, onnxruntime {st['versions']['onnxruntime']}, torch "
              f"{m['torch']}; load average {m['load_average_1m_at_start']:.1f} at start, "
              f"{r.get('load_average_1m_at_end', float('nan')):.1f} at end. Student "
              f"`{r['student_version']}` (bundle `{r['bundles']['fp32']}`), teacher "
              f"`{r['teacher_version']}` ({r['teacher_onnx']['max_seq_length']} tokens), "
              f"{st['threads']} thread(s), {r['queries']} distinct valid queries, "
              f"{st['requests_per_level']} requests per level, events off.")
        for title, header, rows in tables(r):
            print(f"\n**{title}**\n")
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
            for row in rows:
                print("| " + " | ".join(row) + " |")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def floors(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's floors, measured; ``pass`` is False where a figure is missing."""
    ip, load = r["in_process"], r["load"]
    ratio = _ratio(ip["teacher-onnx"]["p50_ms"], ip["student-onnx"]["p50_ms"])
    p99 = ip["student-onnx"]["p99_ms"]
    http_ms = _minus(load["student-onnx"]["1"]["p50_ms"], ip["student-onnx"]["p50_ms"])
    errors = r["swap"]["errors"]

    def row(name: str, value: float | None, shown: str, target: str, ok: bool) -> dict[str, Any]:
        return {"name": name, "value": value, "measured": "n/a" if value is None else shown,
                "target": target, "pass": value is not None and ok}

    return [
        row("teacher / student p50, in process (both ONNX Runtime)", ratio,
            f"{ratio or 0:.0f}x", f">= {FLOORS['ratio']:.0f}x", (ratio or 0) >= FLOORS["ratio"]),
        row("student p99, in process", p99, f"{p99 or 0:.3f} ms",
            f"<= {FLOORS['student_p99_ms']} ms", (p99 or 0) <= FLOORS["student_p99_ms"]),
        row("HTTP path at concurrency 1 (server p50 - in-process p50)", http_ms,
            f"{http_ms or 0:.3f} ms", f"<= {FLOORS['http_ms']} ms",
            (http_ms or 0) <= FLOORS["http_ms"]),
        row("errors during hot swaps", errors, str(errors), "0", errors == 0),
    ]


def ratios(r: dict[str, Any]) -> dict[str, Any]:
    ip, load = r["in_process"], r["load"]
    return {
        "in_process_p50_teacher_over_student": _ratio(ip["teacher-onnx"]["p50_ms"],
                                                      ip["student-onnx"]["p50_ms"]),
        "in_process_p50_torch_over_onnx_student": _ratio(ip["student-torch"]["p50_ms"],
                                                         ip["student-onnx"]["p50_ms"]),
        "http_p50_c1_teacher_over_student": _ratio(load["teacher-onnx"]["1"]["p50_ms"],
                                                   load["student-onnx"]["1"]["p50_ms"]),
        "req_per_s_student_over_teacher": {
            str(level): _ratio(load["student-onnx"][str(level)]["req_per_s"],
                               load["teacher-onnx"][str(level)]["req_per_s"])
            for level in LEVELS},
        "http_overhead_ms_c1": {key: _minus(load[key]["1"]["p50_ms"], ip[key]["p50_ms"])
                                for key in SYSTEMS},
    }


# -- main ------------------------------------------------------------------------------------
def measure(settings: Settings, args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    import onnxruntime as ort

    from codistill.fsio import atomic_write_text
    from codistill.text import evaluate_bm25
    from serving.app import create_app
    from serving.bundle import POINTER_FILE, BundleRegistry
    from serving.commands import build_server
    from serving.runtime import OnnxRanker
    from serving.vectors import VectorCache, evaluate_bundle
    from stores import open_configured_store
    from student.asym import StoreCandidates
    from student.registry import student_registry
    from tasks import dataset as ds

    threads = settings.serving.threads
    home = prepare_home(settings, build=args.home is None or args.build)
    teacher_version, bundles = home["teacher"], home["bundles"]
    valid, test = ds.read_split(settings, "valid"), ds.read_split(settings, "test")
    bodies, pairs = payloads(valid)
    expect = [min(TOP_K, len(ids)) for _, ids in pairs]
    sample = [q for q, _ in pairs[:48]] + [c for ex in valid[:4] for c in ex.candidates[:4]]
    folder, tcard = teacher_graph(settings, teacher_version, sample)

    store = open_configured_store(settings)
    registry = BundleRegistry(settings.bundles_dir)
    pointer = registry.pointer()
    with ExitStack() as stack:
        stack.callback(store.close)
        ids = list(dict.fromkeys([i for _, group in pairs for i in group]
                                 + [i for ex in test for i in ex.candidate_ids]))
        emb, ok = store.get_embeddings(teacher_version, ids)
        if not np.all(ok):
            raise SystemExit(f"{int((~np.asarray(ok)).sum())} candidates have no vector of "
                             f"teacher {teacher_version}: precompute them first")
        vecs = {i: np.asarray(v, dtype=np.float32) for i, v in zip(ids, emb, strict=True)}
        cache = VectorCache(None, teacher_version, capacity=len(ids) + 1)
        cache.put(ids, np.stack([vecs[i] for i in ids]))

        console.print(f"student {home['student']} ({home['kind']}), teacher {teacher_version} "
                      f"({tcard.max_seq_length} tokens), bundles {bundles}, {len(pairs)} "
                      f"distinct valid queries, {threads} thread(s)")
        student_onnx = OnnxRanker.load(registry, bundles["fp32"], threads,
                                       settings.serving.graph_optimization)
        student_torch = student_registry(settings.home).load(
            home["student"], candidate_source=StoreCandidates(store, teacher_version)).eval()
        teacher = TeacherRanker(folder, tcard, threads, settings.serving.graph_optimization)
        ranks = rankers(student_onnx, student_torch, teacher, cache)

        # the real server, its own vector cache preloaded with the same vectors
        server = build_server(settings, bundle=bundles["fp32"])
        stack.callback(lambda: server.store.close() if server.store is not None else None)
        stack.callback(server.sink.close)
        stack.callback(lambda: _restore_pointer(registry, pointer, POINTER_FILE,
                                                atomic_write_text))
        assert server.host.serving is not None and server.host.serving.vectors is not None
        server.host.serving.vectors.put(ids, np.stack([vecs[i] for i in ids]))
        apps = {"student-onnx": create_app(server),
                "student-torch": minimal_app(ranks["student-torch"], home["student"]),
                "teacher-onnx": minimal_app(ranks["teacher-onnx"], teacher_version)}
        ports = {key: stack.enter_context(http_server(app)) for key, app in apps.items()}

        ip = in_process(ranks, pairs, plan.rank_calls, plan.warmup)
        load: dict[str, dict[str, Any]] = {key: {} for key in SYSTEMS}
        runs = tqdm(total=len(LEVELS) * len(SYSTEMS), desc="load runs", unit="run")
        for level in LEVELS:  # systems interleaved per level
            for key in SYSTEMS:
                load_run(ports[key], bodies, expect, min(level, 4), plan.warmup)  # warm up
                load[key][str(level)] = load_run(ports[key], bodies, expect, level,
                                                 plan.requests)
                runs.update()
        runs.close()
        console.print(f"swap run: {plan.swap_seconds:.0f} s, a promote every "
                      f"{plan.swap_interval_s} s")
        swap = swap_run(server, ports["student-onnx"], bodies, expect,
                        [bundles["int8"], bundles["fp32"]], plan.swap_seconds,
                        plan.swap_interval_s)

        direct = evaluate_bundle(student_onnx, VectorCache(store, teacher_version, 10**7), test)
        fb = {"split": "test", "seed": args.seed,
              "rows": fallback_rows(student_onnx, vecs, teacher_version, test, args.seed),
              "bundle_direct": direct, "bm25": evaluate_bm25(test),
              "teacher": teacher_metrics(teacher, vecs, test)}

    import fastapi
    import uvicorn

    return {
        "settings": {
            "threads": threads, "graph_optimization": settings.serving.graph_optimization,
            "candidates_per_request": max(len(ids) for _, ids in pairs), "top_k": TOP_K,
            "concurrency": list(LEVELS), "requests_per_level": plan.requests,
            "warmup_requests": plan.warmup, "rank_calls": plan.rank_calls,
            "swap_seconds": plan.swap_seconds, "swap_interval_s": plan.swap_interval_s,
            "events": "off (serving.emit_events = False)",
            "vectors": "preloaded in memory: one VectorCache shared by the in-process "
                       "rankers and the minimal servers; the real server's own cache "
                       "preloaded with the same vectors",
            "load_generator": "closed loop, one http.client keep-alive connection per "
                              "client thread, in the servers' process",
            "server": "uvicorn (h11, asyncio) in a thread, one per system",
            "versions": {"onnxruntime": ort.__version__, "fastapi": fastapi.__version__,
                         "uvicorn": uvicorn.__version__},
        },
        "home": str(settings.home), "student_version": home["student"],
        "student_kind": home["kind"], "teacher_version": teacher_version,
        "data_hash": home["data_hash"], "student_data_hash": home["student_data_hash"],
        "teacher_onnx": tcard.model_dump(), "bundles": bundles,
        "queries": len(pairs), "in_process": ip, "load": load, "swap": swap,
        "fallback": fb,
    }


def _restore_pointer(registry: Any, pointer: Any, name: str, write: Callable) -> None:
    """Put the home's ``serving.json`` back as it was before the benchmark promoted."""
    path = registry.dir / name
    if pointer.serving is None:
        path.unlink(missing_ok=True)
    else:
        write(path, pointer.model_dump_json(indent=2))


def main(argv: Sequence[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default=None, choices=["small", "demo", "full"],
                    help="data size of the home (default demo; --quick: small)")
    ap.add_argument("--quick", action="store_true",
                    help="small data, a few requests per level (the test suite)")
    ap.add_argument("--home", type=Path, default=None,
                    help="reuse this home's current student (default: build/reuse "
                         "artifacts/bench-serving)")
    ap.add_argument("--build", action="store_true",
                    help="build (or refresh) --home like the default home: data, precompute, "
                         "the default student")
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime intra-op (and torch) threads; default serving.threads")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per system and concurrency level (default 2000, quick 24)")
    ap.add_argument("--rank-calls", type=int, default=None,
                    help="in-process rank calls per system (default 2000, quick 60)")
    ap.add_argument("--swap-seconds", type=float, default=None, help="default 20 (quick 1.5)")
    ap.add_argument("--swap-interval", type=float, default=None, help="default 2 (quick 0.3)")
    ap.add_argument("--seed", type=int, default=0, help="which candidates are forced unknown")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report", action="store_true",
                    help="print the tables of an existing result (--out or the default) only")
    ap.add_argument("--markdown", action="store_true", help="also print the README tables")
    args = ap.parse_args(argv)

    import torch

    size = args.size or ("small" if args.quick else "demo")
    stem = "serving-quick" if args.quick else f"serving-{size}"
    if args.report:
        path = args.out or RESULTS / f"{stem}.json"
        show(json.loads(path.read_text()), args.markdown)
        return path
    home = args.home or Path("artifacts/bench-serving")
    serving: dict[str, Any] = {"emit_events": False}
    if args.threads is not None:
        serving["threads"] = args.threads
    settings = load_settings(home=home, data={"size": size}, serving=serving)
    plan = Plan.make(args.quick, args)
    torch.set_num_threads(settings.serving.threads)  # the torch student's, like ORT's
    result: dict[str, Any] = {"machine": machine(), "size": size, "quick": args.quick}
    result.update(measure(settings, args, plan))
    result["floors"] = floors(result)
    result["ratios"] = ratios(result)
    path = write_result(stem, result, args.out)
    show(json.loads(path.read_text()), args.markdown)  # as written: with the end facts
    console.print(f"written {path}")
    return path


if __name__ == "__main__":
    main()
