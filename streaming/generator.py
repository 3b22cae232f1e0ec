"""Seeded synthetic interaction stream for tests and demos.

Users see a noisy ranking of each query's candidates and click under a
**position-based click model** (Craswell et al. 2008; Joachims et al. 2017):

    P(click at rank r) = P(examined at r) * P(attractive) = (1 / r) ** eta * P(relevant-ish)

with P(attractive) = ``p_click_relevant`` for relevant candidates (relevance > 0)
and ``p_click_noise`` otherwise. A click is followed by an accept with
``p_accept_relevant`` / ``p_accept_noise`` (accepts are a subset of clicks).
Events get event times on a Poisson clock and are *delivered* with a bounded
random delay, so the stream is out of order, as a real one is. Optionally the
stream is salted with malformed messages (bad JSON, a missing field, an unknown
candidate id). Everything is drawn from one ``random.Random(seed)``: the same
inputs and seed give the same bytes.

``schema_version=2`` emits v2 events (feedback differs only in its version); the
impressions carry ``propensities``, the exact probability that the noisy ranker
shows each item at its rank (the logging policy's marginal, what an off-policy
estimator divides by; not the click model's examination probability, which the
learner derives from the rank). They are computed, not drawn, so a v2 stream is
the v1 stream with the field added (salted streams aside: v2 can also break a
propensity). The default (v1) output is byte-identical to that of the generator
before schema version 2.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from streaming.events import (
    BAD_JSON,
    SCHEMA,
    SUPPORTED_SCHEMA_VERSIONS,
    UNKNOWN_CANDIDATE,
    Event,
    Feedback,
    Impression,
)

VALID = "valid"


@dataclass(frozen=True)
class QuerySpec:
    """A query with its candidates and their true graded relevance (> 0 = relevant)."""

    query_id: str
    query: str
    candidate_ids: Sequence[str]
    relevance: Sequence[float]


@dataclass(frozen=True)
class ClickModel:
    eta: float = 1.0
    p_click_relevant: float = 0.9
    p_click_noise: float = 0.05
    p_accept_relevant: float = 0.6
    p_accept_noise: float = 0.05

    def p_click(self, rank: int, relevant: bool) -> float:
        p_attractive = self.p_click_relevant if relevant else self.p_click_noise
        return (1.0 / rank) ** self.eta * p_attractive


@dataclass(frozen=True)
class Message:
    """One message as delivered: the key (request id) and bytes; ``kind`` is the ground truth."""

    key: str
    value: bytes
    kind: str  # "valid" or the rejection code a validator should give
    delivery_time: datetime


@dataclass
class GeneratedStream:
    messages: list[Message]  # in delivery order
    events: list[Event]  # the valid events, in delivery order
    counts: Counter[str] = field(default_factory=Counter)  # messages per kind

    @property
    def malformed(self) -> list[Message]:
        return [m for m in self.messages if m.kind != VALID]


def generate_stream(
    queries: Sequence[QuerySpec],
    n_requests: int,
    seed: int = 0,
    *,
    click_model: ClickModel | None = None,
    ranking_noise: float = 1.0,
    max_shown: int | None = None,
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC),
    mean_interarrival_s: float = 1.0,
    max_feedback_delay_s: float = 30.0,
    max_delivery_delay_s: float = 5.0,
    malformed_rate: float = 0.0,
    model_version: str = "student-v0",
    schema_version: int = 1,
) -> GeneratedStream:
    """Simulate ``n_requests`` searches over ``queries`` (sampled uniformly).

    Shown order: candidates sorted by ``relevance + N(0, ranking_noise)`` (a noisy
    ranker), top ``max_shown``. Feedback happens within ``max_feedback_delay_s`` of
    its impression; each message is delivered up to ``max_delivery_delay_s`` after
    its event time. ``malformed_rate``: expected malformed messages per valid one.
    ``schema_version``: of every event, 1 (the default) or 2, which adds impression
    ``propensities`` (see :func:`rank_propensities`).
    """
    if not queries:
        raise ValueError("queries must not be empty")
    for q in queries:
        if len(q.candidate_ids) != len(q.relevance) or not q.candidate_ids:
            raise ValueError(f"query {q.query_id}: candidate_ids and relevance must match, >= 1")
    if schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ValueError(f"schema_version must be one of {sorted(SUPPORTED_SCHEMA_VERSIONS)}")
    rng = random.Random(seed)
    model = click_model or ClickModel()
    timed: list[tuple[datetime, int, Event]] = []
    marginals: dict[int, dict[str, list[float]]] = {}  # per query index, computed once
    t = start
    for i in range(n_requests):
        t += timedelta(seconds=rng.expovariate(1.0 / mean_interarrival_s))
        qi = rng.randrange(len(queries))
        q = queries[qi]
        rel = dict(zip(q.candidate_ids, q.relevance, strict=True))
        order = sorted(q.candidate_ids, key=lambda c: -(rel[c] + rng.gauss(0.0, ranking_noise)))
        shown = order[: max_shown or len(order)]
        rid = f"req-{seed}-{i:07d}"
        fields = dict(request_id=rid, query_id=q.query_id, query=q.query,
                      candidate_ids=shown, model_version=model_version, event_time=t)
        if schema_version == 1:
            imp = Impression(**fields)
        else:
            if qi not in marginals:
                table = rank_propensities(q.relevance, ranking_noise, len(shown))
                marginals[qi] = dict(zip(q.candidate_ids, table, strict=True))
            props = [marginals[qi][c][r] for r, c in enumerate(shown)]
            imp = Impression.v2(**fields, propensities=props)
        timed.append((t, len(timed), imp))
        for rank, cid in enumerate(shown, start=1):
            relevant = rel[cid] > 0
            if rng.random() >= model.p_click(rank, relevant):
                continue
            t_click = t + timedelta(seconds=rng.uniform(0.1, max_feedback_delay_s / 2))
            dwell = round(rng.expovariate(1 / 20000.0), 1)
            timed.append((t_click, len(timed), Feedback(
                schema_version=schema_version, request_id=rid, candidate_id=cid,
                action="click", position=rank, dwell_ms=dwell, event_time=t_click)))
            p_accept = model.p_accept_relevant if relevant else model.p_accept_noise
            if rng.random() < p_accept:
                t_acc = t_click + timedelta(seconds=rng.uniform(0.1, max_feedback_delay_s / 2))
                timed.append((t_acc, len(timed), Feedback(
                    schema_version=schema_version, request_id=rid, candidate_id=cid,
                    action="accept", position=rank, event_time=t_acc)))

    messages: list[tuple[datetime, int, Message]] = []
    events: list[tuple[datetime, int, Event]] = []
    for ev_time, seq, ev in timed:
        delivered = ev_time + timedelta(seconds=rng.uniform(0.0, max_delivery_delay_s))
        messages.append((delivered, seq, Message(ev.request_id, ev.to_bytes(), VALID, delivered)))
        events.append((delivered, seq, ev))
        if malformed_rate > 0 and rng.random() < malformed_rate:
            bad = _malformed(ev, rng)
            messages.append((delivered, seq, Message(ev.request_id, bad[1], bad[0], delivered)))
    messages.sort(key=lambda m: (m[0], m[1], m[2].kind != VALID))
    events.sort(key=lambda e: (e[0], e[1]))
    out = [m for _, _, m in messages]
    return GeneratedStream(out, [e for _, _, e in events], Counter(m.kind for m in out))


def _malformed(ev: Event, rng: random.Random) -> tuple[str, bytes]:
    """A broken sibling of ``ev`` and the rejection code a validator must give it."""
    kind = rng.choice((BAD_JSON, SCHEMA, UNKNOWN_CANDIDATE))
    data = json.loads(ev.to_bytes())
    if kind == BAD_JSON:
        raw = ev.to_bytes()
        return BAD_JSON, raw[: rng.randrange(1, len(raw) - 1)]
    if kind == SCHEMA:
        has_props = isinstance(ev, Impression) and ev.propensities is not None
        name = rng.choice(["request_id", "event_time", "type", *(["propensities"] * has_props)])
        if name == "propensities":
            data[name][rng.randrange(len(data[name]))] = 0.0  # must be > 0
        else:
            data.pop(name)
        return SCHEMA, json.dumps(data).encode()
    bogus = f"cunknown{rng.getrandbits(48):012x}"
    if isinstance(ev, Impression):
        data["candidate_ids"] = [*data["candidate_ids"], bogus]
        for name, extra in (("propensities", 1.0), ("teams", None)):
            if data.get(name) is not None:  # v2 per-item lists keep their length
                data[name] = [*data[name], extra]
    else:
        data["candidate_id"] = bogus
    return UNKNOWN_CANDIDATE, json.dumps(data).encode()


def rank_propensities(relevance: Sequence[float], noise: float, depth: int,
                      nodes: int = 96) -> list[list[float]]:
    """``P[c][r]``: probability that the noisy ranker shows candidate ``c`` at rank ``r + 1``.

    The ranker sorts by ``relevance + noise * Z`` with i.i.d. standard normal ``Z``.
    Conditioning on candidate ``c``'s own draw ``x``, each other candidate is ranked
    above it independently with probability ``Phi((rel_j - rel_c) / noise - x)``,
    so its rank is 1 + a Poisson-binomial count; the count's distribution is
    integrated over ``x`` by Gauss-Hermite quadrature. Only ranks ``<= depth`` are
    computed (cost ``O(k^2 * depth * nodes)`` per query, cached by the caller);
    values are clipped to ``[1e-12, 1]`` so a logged propensity is always valid.

    Examples
    --------
    >>> p = rank_propensities([1.0, 0.0], noise=1.0, depth=2)
    >>> [round(v, 4) for v in p[0]]  # Phi(1 / sqrt(2)) = 0.7602
    [0.7602, 0.2398]
    >>> rank_propensities([1.0, 1.0, 0.0], noise=0.0, depth=2)  # ties keep list order
    [[1.0, 1e-12], [1e-12, 1.0], [1e-12, 1e-12]]
    """
    rel = np.asarray(relevance, dtype=np.float64)
    k, depth = len(rel), min(depth, len(rel))
    sigma = abs(float(noise))
    out = np.zeros((k, depth))
    if sigma == 0.0:  # deterministic: a stable sort by relevance, as the generator's
        for r, c in enumerate(sorted(range(k), key=lambda c: -rel[c])[:depth]):
            out[c, r] = 1.0
    else:
        x, w = np.polynomial.hermite_e.hermegauss(nodes)
        w = w / w.sum()
        phi = np.vectorize(lambda z: 0.5 * math.erfc(-z / math.sqrt(2.0)))
        for c in range(k):
            others = np.delete(rel, c)
            above = phi((others[:, None] - rel[c]) / sigma - x[None, :])  # [k - 1, nodes]
            dist = np.zeros((nodes, depth))
            dist[:, 0] = 1.0
            for p in above:  # add one competitor: P(count = m) for m < depth
                dist[:, 1:] = dist[:, 1:] * (1.0 - p[:, None]) + dist[:, :-1] * p[:, None]
                dist[:, 0] *= 1.0 - p
            out[c] = w @ dist
    return np.clip(out, 1e-12, 1.0).tolist()
