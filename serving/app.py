"""The HTTP server: FastAPI on ONNX Runtime, torch-free.

Endpoints
---------
``POST /v1/rank``       rank candidates for a query with the serving bundle
``POST /v1/feedback``   a user action on a served candidate (position filled in here,
                        the client's examination ``propensity`` passed on when given)
``GET  /healthz``       the process is up
``GET  /readyz``        a bundle is loaded and warmed, and the store has not been down
                        longer than ``serving.store_unready_after_s``
``GET  /metrics``       Prometheus text format (``serving.telemetry``)
``/v1/admin/...``       bundles, load, promote, rollback (``X-API-Key``; off without
                        ``serving.admin_api_key``)

Every 4xx has a JSON body ``{"detail": "..."}`` that names the offending field and,
for a configurable limit, the setting. Candidate vectors of an asymmetric student
come from the store by id (the bundle's teacher version) through an in-memory cache;
a candidate the store does not know is encoded from its text by the bundle's fallback
graph, marked ``fallback: true`` and listed in the impression (event schema v2), so the
teacher can embed it later. Events leave through a bounded queue
(``serving.events_out``): a broker outage never fails a request.
"""

from __future__ import annotations

import hmac
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from codistill.config import ServingSettings
from codistill.ids import candidate_id, query_id
from serving.bundle import BundleError
from serving.events_out import EventSink, Outgoing
from serving.host import Loaded, ModelHost, NoPreviousBundle
from serving.monitor import Observation, QualityMonitor
from serving.schemas import (
    AdminResult,
    BundleInfo,
    FeedbackRequest,
    FeedbackResponse,
    Problem,
    RankedItem,
    RankRequest,
    RankResponse,
    Readiness,
    VersionRequest,
)
from serving.telemetry import ServingMetrics
from stores.base import CandidateStore, StoreError
from streaming.events import Feedback, Impression

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem}, 404: {"model": Problem}, 409: {"model": Problem},
    422: {"model": Problem},
    503: {"model": Problem}}


@dataclass(frozen=True)
class Served:
    """What ``/v1/feedback`` needs to know about an impression it served."""

    query_id: str
    candidate_ids: tuple[str, ...]
    model_version: str
    unknown: frozenset[str] = frozenset()  # shown candidates ranked by the fallback


class ImpressionMemory:
    """Bounded LRU ``request_id -> Served`` (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Served] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, request_id: str, served: Served) -> None:
        with self._lock:
            self._items[request_id] = served
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, request_id: str) -> Served | None:
        with self._lock:
            return self._items.get(request_id)


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


def _describe_validation(exc: RequestValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return f"{loc}: {first.get('msg', 'invalid')}"


class Server:
    """The state behind the routes: settings, host, store, events, metrics."""

    def __init__(self, cfg: ServingSettings, host: ModelHost, store: CandidateStore | None,
                 sink: EventSink, metrics: ServingMetrics,
                 monitor: QualityMonitor | None = None) -> None:
        self.cfg, self.host, self.store, self.sink, self.metrics = cfg, host, store, sink, metrics
        self.monitor = monitor
        self.impressions = ImpressionMemory(cfg.impressions_kept)

    # -- /v1/rank ------------------------------------------------------------------------
    def _ids(self, req: RankRequest) -> list[str]:
        cfg = self.cfg
        if len(req.query) > cfg.max_query_chars:
            raise _unprocessable(f"query: {len(req.query)} characters, more than "
                                 f"serving.max_query_chars = {cfg.max_query_chars}")
        if len(req.candidates) > cfg.max_candidates:
            raise _unprocessable(f"candidates: {len(req.candidates)} given, more than "
                                 f"serving.max_candidates = {cfg.max_candidates}")
        ids: list[str] = []
        seen: set[str] = set()
        for i, c in enumerate(req.candidates):
            if c.text is not None and len(c.text) > cfg.max_text_chars:
                raise _unprocessable(f"candidates[{i}].text: {len(c.text)} characters, more "
                                     f"than serving.max_text_chars = {cfg.max_text_chars}")
            if c.id is None and c.text is None:
                raise _unprocessable(f"candidates[{i}]: give an id, a text or both")
            cid = c.id if c.id is not None else candidate_id(c.text or "")
            if c.id is not None and c.text is not None and not cfg.user_supplied_ids:
                expected = candidate_id(c.text)
                if expected != c.id:
                    raise _unprocessable(
                        f"candidates[{i}]: id {c.id!r} is not the content hash of its text "
                        f"({expected!r}); send the text alone, or set "
                        "serving.user_supplied_ids if ids are your own names")
            if cid in seen:
                raise _unprocessable(f"candidates[{i}]: duplicate id {cid!r}")
            seen.add(cid)
            ids.append(cid)
        return ids

    def _vectors(self, lo: Loaded, req: RankRequest, ids: list[str]
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Candidate matrix and the fallback mask (True: encoded from text here)."""
        ranker = lo.ranker
        texts = [c.text for c in req.candidates]
        if ranker.card.has_candidate_tower:
            need = [i for i, t in enumerate(texts) if t is None]
            if need and self.store is not None:
                try:
                    got = self.store.get_texts([ids[i] for i in need])
                except StoreError as exc:
                    self.metrics.store_errors.labels("get_texts").inc()
                    raise HTTPException(503, f"store unavailable: {exc}") from None
                for i, t in zip(need, got, strict=True):
                    texts[i] = t
            unknown = [ids[i] for i, t in enumerate(texts) if t is None]
            if unknown:
                raise _unprocessable(f"unknown candidate id {unknown[0]!r} sent without text")
            return ranker.embed_candidates([t or "" for t in texts]), np.zeros(len(ids), bool)
        assert lo.vectors is not None
        c, found, hits, misses, store_failed = lo.vectors.get(ids)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(misses)
        if store_failed:
            self.metrics.store_errors.labels("get_embeddings").inc()
        if c is None:
            c = np.zeros((len(ids), ranker.card.embedding_dim), dtype=np.float32)
        cold = np.flatnonzero(~found)
        no_text = [ids[i] for i in cold if texts[i] is None]
        if no_text:
            if store_failed:
                raise HTTPException(503, f"store unavailable and candidate {no_text[0]!r} "
                                         "was sent without text")
            raise _unprocessable(f"unknown candidate id {no_text[0]!r} sent without text")
        if len(cold):
            c[cold] = ranker.embed_candidates([texts[i] or "" for i in cold])
        return c, ~found

    def rank(self, req: RankRequest) -> RankResponse:
        lo = self.host.serving  # read once: this request finishes on this bundle
        if lo is None:
            raise HTTPException(503, "no bundle loaded yet")
        ids = self._ids(req)
        start = time.perf_counter()
        c, fallback = self._vectors(lo, req, ids)
        ranker = lo.ranker
        qvec, n_tokens, n_oov = ranker.embed_query_counted(req.query)
        scores = ranker.scores(qvec, c)
        top_k = min(req.top_k or self.cfg.default_top_k, len(ids))
        order = np.argsort(-scores, kind="stable")[:top_k]
        version = lo.version
        request_id = uuid.uuid4().hex
        results = [RankedItem(id=ids[i], score=float(scores[i]), rank=r + 1,
                              fallback=bool(fallback[i])) for r, i in enumerate(order)]
        shown = [ids[i] for i in order]
        m = self.metrics
        m.rank_latency.labels(version).observe(time.perf_counter() - start)
        m.candidates.labels(version).inc(len(ids))
        n_fallback = int(fallback.sum())
        if n_fallback:
            m.fallbacks.labels(version).inc(n_fallback)
        m.impressions.labels(version).inc()
        m.query_tokens.labels(version).inc(n_tokens)
        m.query_oov.labels(version).inc(n_oov)
        qid = query_id(req.query)
        if self.monitor is not None:
            card = ranker.card
            ref = card.drift.get("reference")
            self.monitor.submit(Observation(
                version, card.teacher_version, qid, qvec, tuple(ids), scores,
                n_oov / max(1, n_tokens), n_fallback / max(1, len(ids)),
                ranker.folder / ref if ref else None))
        unknown = [ids[i] for i in order if fallback[i]]
        self.impressions.put(request_id, Served(qid, tuple(shown), version, frozenset(unknown)))
        if self.cfg.emit_events:
            imp = Impression.v2(request_id=request_id, query_id=qid, query=req.query,
                                candidate_ids=shown, model_version=version,
                                event_time=datetime.now(UTC),
                                unknown_candidate_ids=unknown)
            texts = {ids[i]: req.candidates[i].text or "" for i in np.flatnonzero(fallback)}
            self.sink.submit(Outgoing(imp, texts))
        return RankResponse(request_id=request_id, model_version=version, results=results)

    # -- /v1/feedback --------------------------------------------------------------------
    def feedback(self, req: FeedbackRequest) -> FeedbackResponse:
        served = self.impressions.get(req.request_id)
        if served is None:
            raise HTTPException(404, f"unknown request_id {req.request_id!r} (never served "
                                     "here, or older than serving.impressions_kept requests)")
        if req.candidate_id not in served.candidate_ids:
            raise _unprocessable(f"candidate_id {req.candidate_id!r} was not shown in "
                                 f"request {req.request_id!r}")
        position = served.candidate_ids.index(req.candidate_id) + 1
        if self.metrics.holds(served.model_version):  # an unloaded version's series stay gone
            self.metrics.observe_feedback(served.model_version, req.action, position)
        if self.cfg.emit_events:
            fb = Feedback.v2(request_id=req.request_id, candidate_id=req.candidate_id,
                             action=req.action, position=position, dwell_ms=req.dwell_ms,
                             propensity=req.propensity, event_time=datetime.now(UTC),
                             unknown_candidate=req.candidate_id in served.unknown)
            self.sink.submit(Outgoing(fb))
        return FeedbackResponse(request_id=req.request_id, candidate_id=req.candidate_id,
                                position=position)

    # -- readiness -----------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        lo = self.host.serving
        if lo is None:
            return False, "no bundle loaded"
        if lo.vectors is not None:
            down = lo.vectors.store_down_for()
            if down > self.cfg.store_unready_after_s:
                return False, f"store unreachable for {down:.0f} s"
        return True, f"serving {lo.version}"


def create_app(server: Server) -> FastAPI:
    """The FastAPI application over a :class:`Server`."""
    app = FastAPI(title="codistill serving", version="1",
                  description="Rank code candidates with a distilled student (ONNX Runtime).")
    app.state.server = server
    m = server.metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _describe_validation(exc)}, status_code=422)

    @app.middleware("http")
    async def _measure(request: Request, call_next: Callable[[Request], Any]) -> Response:
        route = request.scope.get("route")
        start = time.perf_counter()
        m.in_flight.inc()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            m.in_flight.dec()
            endpoint = getattr(request.scope.get("route", route), "path", "unmatched")
            m.latency.labels(endpoint).observe(time.perf_counter() - start)
            m.requests.labels(endpoint, str(status)).inc()

    @app.post("/v1/rank", response_model=RankResponse, responses=ERRORS)
    def rank(req: RankRequest) -> RankResponse:
        return server.rank(req)

    @app.post("/v1/feedback", response_model=FeedbackResponse, responses=ERRORS)
    def feedback(req: FeedbackRequest) -> FeedbackResponse:
        return server.feedback(req)

    @app.get("/healthz", response_model=dict[str, str])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    def readyz() -> JSONResponse:
        ok, detail = server.readiness()
        m.ready.set(1 if ok else 0)
        return JSONResponse({"ready": ok, "detail": detail}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        m.queue_depth.set(server.sink.depth())
        if server.monitor is not None:
            server.monitor.refresh()
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    def _admin(key: str | None) -> None:
        expected = server.cfg.admin_api_key
        if not expected:  # unset or empty (an empty variable): no key can be right
            raise HTTPException(404, "admin API disabled: set serving.admin_api_key")
        if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong X-API-Key")

    def _result(action: str, detail: str = "") -> AdminResult:
        slots = server.host.slots()
        return AdminResult(action=action, serving=slots["serving"], previous=slots["previous"],
                           detail=detail)

    admin_errors = {**ERRORS, 401: {"model": Problem}}

    @app.get("/v1/admin/bundles", response_model=list[BundleInfo], responses=admin_errors)
    def bundles(x_api_key: str | None = Header(None)) -> list[BundleInfo]:
        _admin(x_api_key)
        slots = {v: k for k, v in server.host.slots().items() if v}
        out = []
        for v in server.host.registry.versions():
            card = server.host.registry.load_card(v)
            out.append(BundleInfo(version=v, kind=card.kind, teacher_version=card.teacher_version,
                                  precision=card.precision, created_at=card.created_at,
                                  slot=slots.get(v)))  # type: ignore[arg-type]
        return out

    def _change(action: str, fn: Callable[[], Loaded]) -> AdminResult:
        try:
            lo = fn()
        except NoPreviousBundle as exc:
            raise HTTPException(409, str(exc)) from None
        except BundleError as exc:
            raise HTTPException(422, str(exc)) from None
        return _result(action, lo.version)

    @app.post("/v1/admin/load", response_model=AdminResult, responses=admin_errors)
    def load(req: VersionRequest, x_api_key: str | None = Header(None)) -> AdminResult:
        _admin(x_api_key)
        return _change("load", lambda: server.host.load(req.version))

    @app.post("/v1/admin/promote", response_model=AdminResult, responses=admin_errors)
    def promote(req: VersionRequest, x_api_key: str | None = Header(None)) -> AdminResult:
        _admin(x_api_key)
        return _change("promote", lambda: server.host.promote(req.version))

    @app.post("/v1/admin/rollback", response_model=AdminResult, responses=admin_errors)
    def rollback(x_api_key: str | None = Header(None)) -> AdminResult:
        _admin(x_api_key)
        return _change("rollback", server.host.rollback)

    return app
