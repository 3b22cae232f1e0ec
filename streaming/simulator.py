"""Seeded simulated users: draw queries, look at a ranker's list, click under a click model.

The users are seeded and shared by every arm of an experiment (common random numbers:
visit ``i`` is the same query, preference and click randomness whatever ranker serves it),
position-biased in a known way, and relevant on something the teacher does not know: 2
for gold, 1 for a negative matching the user's :class:`Preference` (a code style, capped
at 1/4 of the negatives), else 0. A grade-1 item is relevant with probability
``strength`` (<= 0.5) per impression, so under the position-based model an examined one
is clicked at most half as often as gold (a cascade also clicks non-relevant items, so
slightly more); after ``switch_after`` impressions the preference drifts to ``switch_to``.
Click models have binary relevance as in Hofmann et al. (2013): position-based or cascade
(Craswell et al. 2008). ``Feedback.propensity`` (schema v2) is the examination
probability of the clicked rank, the model's exact one or, with ``propensity="swap"``, an
estimate from randomized adjacent swaps (:func:`estimate_examination`), so inverse
propensity weighting is tested without being told the answer. Pure: nothing is sent.

References
----------
Hofmann, Whiteson, de Rijke. Fidelity, soundness, and efficiency of interleaved comparison
methods. ACM TOIS 31(4), 2013. Craswell, Zoeter, Taylor, Ramsey. An experimental
comparison of click position-bias models. WSDM 2008. Joachims, Swaminathan, Schnabel.
Unbiased learning-to-rank with biased feedback. WSDM 2017. Agarwal, Zaitsev, Wang, Li,
Najork, Joachims. Estimating position bias without intrusive interventions. WSDM 2019.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Literal, Protocol

import numpy as np

from codistill.ranking import RankingExample
from streaming.events import Feedback, Impression

MIN_PROPENSITY = 1e-6
START = datetime(2026, 1, 1, tzinfo=UTC)  # the simulated clock: visit i is at START + i s
_SWAP_KEY = 0x5357  # spawn key of the swap experiment's rng (apart from every visit's)
_SIG = re.compile(r"^\s*(?:async\s+)?def\s+\w+\s*\(((?:[^()]|\((?:[^()]|\([^()]*\))*\))*)\)\s*(->)?",
                  re.MULTILINE)  # the parameters (brackets nested twice) and a return arrow
_NESTED = re.compile(r"\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}")
_LOOP = re.compile(r"^\s*(?:async\s+)?(?:for|while)\b", re.MULTILINE)


def _typed(code: str) -> bool:
    """The first ``def`` has ``->`` or a parameter annotation (a ``:`` outside brackets; a
    lambda default counts too: a cheap check)."""
    if (m := _SIG.search(code)) is None:
        return False
    return m.group(2) is not None or ":" in _NESTED.sub("", _NESTED.sub("", m.group(1)))


# Textual, deterministic code-style checks (a word in a string or comment counts too).
PREFERENCES: dict[str, Callable[[str], bool]] = {
    "typed": _typed,  # an annotated signature
    "raises": lambda code: re.search(r"\braise\b", code) is not None,
    "generator": lambda code: re.search(r"\byield\b", code) is not None,
    "short": lambda code: sum(1 for line in code.splitlines() if line.strip()) <= 6,
    "loops": lambda code: _LOOP.search(code) is not None,  # a for/while statement
}


@dataclass(frozen=True)
class Preference:
    """A code style the simulated user likes and the teacher does not know about."""
    name: str
    predicate: Callable[[str], bool]

    def __call__(self, code: str) -> bool:
        return bool(self.predicate(code))


def _check(kind: str, name: str, known: Sequence[str]) -> None:
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(known)}")


def preference(name: str) -> Preference:
    """The preference ``name`` from :data:`PREFERENCES` (ValueError lists the known ones)."""
    _check("preference", name, list(PREFERENCES))
    return Preference(name, PREFERENCES[name])


def grades(example: RankingExample, pref: Preference, *, max_share: float = 0.25,
           salt: str = "") -> list[int]:
    """True relevance per candidate (in the example's order): 2 gold, 1 preferred, else 0.

    Preferred negatives are capped at ``floor(max_share * n_negatives)`` so that the
    preference shifts a ranking without drowning gold; when more match, those first by
    ``sha256(salt + candidate_id)`` keep grade 1 (stable across runs and processes).

    Examples
    --------
    >>> ex = RankingExample(query="q", labels=[1, 0, 0, 0, 0], candidates=[
    ...     "def f(x):\\n    return x", "def g(x: int):\\n    return x",
    ...     "def h(y) -> int:\\n    return y", "def k(z):\\n    pass", "def m(w):\\n    pass"])
    >>> grades(ex, preference("typed"))  # two match, floor(4 / 4) = 1 keeps its grade
    [2, 0, 1, 0, 0]
    """
    if not 0.0 <= max_share <= 1.0:
        raise ValueError(f"max_share must be in [0, 1], got {max_share}")
    gold = example.gold_index
    out = [2 if i == gold else 0 for i in range(len(example.candidates))]
    matching = [i for i, code in enumerate(example.candidates) if i != gold and pref(code)]
    cap = math.floor(max_share * (len(out) - 1) + 1e-9)
    key = lambda i: hashlib.sha256((salt + example.candidate_ids[i]).encode()).hexdigest()  # noqa: E731
    for i in sorted(matching, key=key)[:cap]:
        out[i] = 1
    return out


class ClickModel(Protocol):
    """Clicks on shown lists of grades (rank 1 first; -1 pads a short list): ``[N, depth]``
    booleans, one impression's 0-based clicked positions, and its examination per rank."""
    def click_matrix(self, grades: np.ndarray, strength: float,
                     rng: np.random.Generator) -> np.ndarray: ...
    def clicks(self, shown_grades: Sequence[int], strength: float,
               rng: np.random.Generator) -> list[int]: ...
    def propensities(self, shown_grades: Sequence[int], strength: float) -> list[float]: ...


def _draws(grades: np.ndarray, strength: float, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Binary relevance per impression (grade 1 relevant w.p. ``strength``), presence and two
    uniforms: three ``[N, depth]`` draws in one order, so the same list and seed give the
    same clicks and two lists share each position's uniforms (common random numbers)."""
    g = np.asarray(grades, dtype=np.int64).reshape(-1, np.shape(grades)[-1])
    u_rel, u_a, u_b = (rng.random(g.shape) for _ in range(3))
    return (g == 2) | ((g == 1) & (u_rel < strength)), g >= 0, u_a, u_b


def _probabilities(model: object, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(model, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(model, name)}")


class _Clicks:
    def clicks(self, shown_grades: Sequence[int], strength: float,
               rng: np.random.Generator) -> list[int]:
        """0-based clicked positions of one impression."""
        if not len(shown_grades):
            return []
        hit = self.click_matrix(np.asarray([shown_grades]), strength, rng)  # type: ignore[attr-defined]
        return np.flatnonzero(hit[0]).tolist()


@dataclass(frozen=True)
class PositionBased(_Clicks):
    """Examined with ``(1 / rank) ** eta``, then clicked with ``p_click_rel``/``_nonrel``."""
    eta: float = 1.0
    p_click_rel: float = 1.0
    p_click_nonrel: float = 0.0

    def __post_init__(self) -> None:
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        _probabilities(self, "p_click_rel", "p_click_nonrel")

    def click_matrix(self, grades: np.ndarray, strength: float,
                     rng: np.random.Generator) -> np.ndarray:
        relevant, present, u_a, u_b = _draws(grades, strength, rng)
        exam = (1.0 / np.arange(1, relevant.shape[1] + 1)) ** self.eta
        attract = np.where(relevant, self.p_click_rel, self.p_click_nonrel)
        return present & (u_a < exam) & (u_b < attract)

    def propensities(self, shown_grades: Sequence[int], strength: float) -> list[float]:
        """``(1 / r) ** eta`` whatever the grades."""
        exam = (1.0 / np.arange(1, len(shown_grades) + 1)) ** self.eta
        return np.clip(exam, MIN_PROPENSITY, 1.0).tolist()


@dataclass(frozen=True)
class Cascade(_Clicks):
    """Scan from rank 1; click with ``p_click_*``; after a click stop with ``p_stop_*``."""
    p_click_nonrel: float
    p_click_rel: float
    p_stop_nonrel: float
    p_stop_rel: float

    def __post_init__(self) -> None:
        _probabilities(self, "p_click_nonrel", "p_click_rel", "p_stop_nonrel", "p_stop_rel")

    def click_matrix(self, grades: np.ndarray, strength: float,
                     rng: np.random.Generator) -> np.ndarray:
        relevant, present, u_a, u_b = _draws(grades, strength, rng)
        p_click = np.where(relevant, self.p_click_rel, self.p_click_nonrel)
        p_stop = np.where(relevant, self.p_stop_rel, self.p_stop_nonrel)
        hit = np.zeros(relevant.shape, dtype=bool)
        reading = np.ones(relevant.shape[0], dtype=bool)
        for r in range(relevant.shape[1]):
            hit[:, r] = reading & present[:, r] & (u_a[:, r] < p_click[:, r])
            reading &= ~(hit[:, r] & (u_b[:, r] < p_stop[:, r]))
        return hit

    def propensities(self, shown_grades: Sequence[int], strength: float) -> list[float]:
        """Exact probability of reaching each rank (item relevances are independent):
        ``P(reach r + 1) = P(reach r) * (1 - sum_rel P(rel_r) P(click|rel) P(stop|rel))``.

        >>> [round(p, 5) for p in NAVIGATIONAL.propensities([2, 0, 0], 0.5)]  # 1 - .95 * .9
        [1.0, 0.145, 0.14355]
        """
        out, reach = [], 1.0
        for g in shown_grades:
            out.append(reach)
            p_rel = 1.0 if g == 2 else strength if g == 1 else 0.0
            stop = (p_rel * self.p_click_rel * self.p_stop_rel
                    + (1 - p_rel) * self.p_click_nonrel * self.p_stop_nonrel)
            reach *= 1.0 - (stop if g >= 0 else 0.0)
        return np.clip(out, MIN_PROPENSITY, 1.0).tolist()


PERFECT = Cascade(p_click_nonrel=0.0, p_click_rel=1.0, p_stop_nonrel=0.0, p_stop_rel=0.0)
NAVIGATIONAL = Cascade(p_click_nonrel=0.05, p_click_rel=0.95, p_stop_nonrel=0.2, p_stop_rel=0.9)
INFORMATIONAL = Cascade(p_click_nonrel=0.4, p_click_rel=0.9, p_stop_nonrel=0.1, p_stop_rel=0.5)
CLICK_MODELS: dict[str, ClickModel] = {"pbm": PositionBased(), "perfect": PERFECT,
                                       "navigational": NAVIGATIONAL, "informational": INFORMATIONAL}


def estimate_examination(click_model: ClickModel, lists_of_grades: Sequence[Sequence[int]],
                         strength: float, depth: int, rng: np.random.Generator) -> list[float]:
    """Examination per rank from randomized swaps of adjacent results, without the model.

    Each list gets a pair ``k`` uniform in ``[1, depth - 1]`` and, w.p. 1/2, its items at
    ``k`` and ``k + 1`` swapped: over both arms each item sits at either rank equally
    often, so relevance cancels and clicks at ``k + 1`` over clicks at ``k`` estimate
    ``p_{k+1} / p_k`` (swap intervention, Joachims et al. 2017; adjacent pairs, Agarwal et
    al. 2019). Chained from ``p_1 = 1``, non-increasing, clipped to ``[1e-6, 1]``; a pair
    without a click at ``k`` keeps ``p_k``; short lists are padded with absent items.
    Unbiased under a position-based model; a position-only fit of a cascade.
    """
    if depth < 1 or not lists_of_grades:
        raise ValueError("need depth >= 1 and at least one list")
    g = np.full((len(lists_of_grades), depth), -1, dtype=np.int64)
    for n, row in enumerate(lists_of_grades):
        g[n, : min(depth, len(row))] = list(row)[:depth]
    if depth == 1:
        return [1.0]
    pair = rng.integers(1, depth, size=len(g))  # 1-based: swap ranks pair and pair + 1
    swap = np.flatnonzero(rng.random(len(g)) < 0.5)
    k = pair[swap] - 1
    g[swap, k], g[swap, k + 1] = g[swap, k + 1], g[swap, k].copy()
    hit = click_model.click_matrix(g, strength, rng)
    ratios = []
    for k in range(1, depth):
        rows = hit[pair == k]
        above, below = rows[:, k - 1].sum(), rows[:, k].sum()
        ratios.append(below / above if above else 1.0)
    p = np.minimum.accumulate(np.cumprod([1.0, *ratios]))
    return np.clip(p, MIN_PROPENSITY, 1.0).tolist()


@dataclass(frozen=True)
class SimulatorConfig:
    """The simulated users: seed, click model, preference (and its drift), list depth.

    ``strength``: P(a grade-1 item is relevant), in [0, 0.5]. ``switch_after``: impressions
    before the preference becomes ``switch_to`` (None: never). ``propensity``: what
    feedback logs, the model's examination or a swap estimate over ``swap_lists`` lists.
    """
    seed: int = 0
    click_model: str = "pbm"
    strength: float = 0.5
    preference: str = "typed"
    switch_to: str = "raises"
    switch_after: int | None = None
    depth: int = 10
    propensity: Literal["model", "swap"] = "model"
    swap_lists: int = 20000

    def __post_init__(self) -> None:
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        _check("click_model", self.click_model, list(CLICK_MODELS))
        if not 0.0 <= self.strength <= 0.5:
            raise ValueError(f"strength must be in [0, 0.5] (preferred items are clicked at "
                             f"most half as often as gold), got {self.strength}")
        _check("preference", self.preference, list(PREFERENCES))
        _check("switch_to preference", self.switch_to, list(PREFERENCES))
        if (self.switch_after or 0) < 0 or self.depth < 1 or self.swap_lists < 1:
            raise ValueError("need switch_after None or >= 0, depth >= 1, swap_lists >= 1")
        _check("propensity", self.propensity, ["model", "swap"])

    @property
    def model(self) -> ClickModel:
        return CLICK_MODELS[self.click_model]


class Ranker(Protocol):
    """What is compared: indices into ``example.candidate_ids``, best first."""
    @property
    def version(self) -> str: ...  # written as the impression's model_version
    def rank(self, example: RankingExample) -> Sequence[int]: ...


@dataclass(frozen=True)
class Visit:
    """One user visit, identical for every arm: query, preference, grades, click seed."""
    index: int
    example: RankingExample
    preference: Preference
    grades: tuple[int, ...]  # per candidate, in the example's order
    click_seed: int
    first_seen: bool  # the first visit of this query id in the stream
    event_time: datetime
    swap_propensities: tuple[float, ...] | None = None  # per rank, for propensity="swap"


class UserStream:
    """The seeded user side of an experiment, shared by every arm (common random numbers).

    Visit ``i`` comes from ``default_rng([seed, i])`` alone (the example, uniform with
    replacement from the online split, then the click seed): arm A's visit ``i`` is B's.
    """

    def __init__(self, examples: Sequence[RankingExample], cfg: SimulatorConfig, *,
                 start: datetime = START) -> None:
        if not examples:
            raise ValueError("examples must not be empty")
        self.examples, self.cfg, self.start = list(examples), cfg, start
        self._prefs = {n: preference(n) for n in (cfg.preference, cfg.switch_to)}
        self._grades: dict[tuple[str, int], tuple[int, ...]] = {}
        self._choices: list[int] = []
        self._first: dict[str, int] = {}

    def grades_of(self, e: int, pref: str) -> tuple[int, ...]:
        """Grades of example ``e`` under preference ``pref`` (cached)."""
        if (pref, e) not in self._grades:
            self._grades[pref, e] = tuple(grades(self.examples[e], self._prefs[pref]))
        return self._grades[pref, e]

    def preference_at(self, i: int) -> str:
        """The active preference at visit ``i`` (before or after the drift switch)."""
        after = self.cfg.switch_after
        return self.cfg.preference if after is None or i < after else self.cfg.switch_to

    def draw(self, i: int) -> Visit:
        """Visit ``i`` (``i >= 0``); the same whatever was drawn before."""
        if i < 0:
            raise ValueError(f"visit index must be >= 0, got {i}")
        n = len(self.examples)
        while len(self._choices) <= i:  # first_seen needs the earlier visits' queries
            j = len(self._choices)
            self._choices.append(int(np.random.default_rng([self.cfg.seed, j]).integers(n)))
            self._first.setdefault(self.examples[self._choices[j]].query_id, j)
        rng = np.random.default_rng([self.cfg.seed, i])
        e, pref = int(rng.integers(n)), self.preference_at(i)
        ex = self.examples[e]
        return Visit(i, ex, self._prefs[pref], self.grades_of(e, pref),
                     int(rng.integers(2**63 - 1)), self._first[ex.query_id] == i,
                     self.start + timedelta(seconds=i),
                     self.swap_estimate if self.cfg.propensity == "swap" else None)

    @cached_property
    def swap_estimate(self) -> tuple[float, ...]:
        """:func:`estimate_examination` over ``cfg.swap_lists`` drawn examples (initial
        preference), each list every relevant candidate plus random others in random order:
        ranker-independent (one estimate for every arm) and with clicks at every rank."""
        cfg = self.cfg
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_SWAP_KEY,)))
        lists = []
        for e in rng.integers(len(self.examples), size=cfg.swap_lists).tolist():
            g = self.grades_of(e, cfg.preference)
            rel = [j for j, v in enumerate(g) if v > 0]
            fill = rng.permutation([j for j, v in enumerate(g) if v == 0]).tolist()
            shown = rng.permutation(rel + fill[: max(cfg.depth - len(rel), 0)])
            lists.append([g[j] for j in shown])
        return tuple(estimate_examination(cfg.model, lists, cfg.strength, cfg.depth, rng))


def _order(ranker: Ranker, example: RankingExample) -> list[int]:
    order, n = [int(j) for j in ranker.rank(example)], len(example.candidate_ids)
    if not order or len(set(order)) != len(order) or not all(0 <= j < n for j in order):
        raise ValueError(f"ranker {ranker.version!r} returned {order[:12]} for "
                         f"{n} candidates: need distinct indices in [0, {n})")
    return order


@dataclass(frozen=True)
class Interaction:
    """What one visit produced: the v2 impression, its click feedback, the shown grades."""
    impression: Impression
    feedback: list[Feedback]
    shown_grades: list[int]
    visit: Visit
    clicked: list[int] = field(default_factory=list)  # 0-based positions

    @property
    def events(self) -> list[Impression | Feedback]:
        return [self.impression, *self.feedback]


def simulate_one(visit: Visit, ranker: Ranker, cfg: SimulatorConfig, *,
                 request_id: str) -> Interaction:
    """Show ``ranker``'s top ``cfg.depth`` for ``visit`` and emit the user's events.

    Clicks come from the visit's click seed only: two rankers showing the same list get the
    same clicks. Each click's ``propensity`` is the examination probability of its rank
    (the click model's, or the swap estimate). The impression carries no ``propensities``:
    that field is the *logging policy's* probability of showing an item at its rank
    (:mod:`streaming.events`), and a ranker here is deterministic.
    """
    ex = visit.example
    shown = _order(ranker, ex)[: cfg.depth]
    shown_grades = [visit.grades[j] for j in shown]
    clicked = cfg.model.clicks(shown_grades, cfg.strength,
                               np.random.default_rng(visit.click_seed))
    if cfg.propensity == "swap":
        if visit.swap_propensities is None:
            raise ValueError("propensity='swap' needs a visit drawn by a swap UserStream")
        props = list(visit.swap_propensities[: len(shown)])
    else:
        props = cfg.model.propensities(shown_grades, cfg.strength)
    ids = [ex.candidate_ids[j] for j in shown]
    imp = Impression.v2(request_id=request_id, query_id=ex.query_id, query=ex.query,
                        candidate_ids=ids, model_version=ranker.version,
                        event_time=visit.event_time)
    fb = [Feedback.v2(request_id=request_id, candidate_id=ids[p], action="click",
                      position=p + 1, propensity=props[p],
                      event_time=visit.event_time + timedelta(milliseconds=100 * (p + 1)))
          for p in clicked]
    return Interaction(imp, fb, shown_grades, visit, clicked)


def simulate(examples: Sequence[RankingExample], ranker: Ranker, cfg: SimulatorConfig,
             n: int, *, request_prefix: str = "sim") -> Iterator[Interaction]:
    """``n`` visits of a fresh :class:`UserStream`, served by ``ranker``."""
    stream = UserStream(examples, cfg)
    for i in range(n):
        yield simulate_one(stream.draw(i), ranker, cfg,
                           request_id=f"{request_prefix}-{cfg.seed}-{i:07d}")


def ndcg_at(ranked_grades: Sequence[int], all_grades: Sequence[int], k: int = 10) -> float:
    """NDCG@k, gain ``2^g - 1`` (gold worth 3 preferred; :func:`codistill.metrics.ndcg_at_k`
    is linear), ideal from all of the list's grades; 0 when nothing is relevant.

    >>> round(ndcg_at([0, 2], [2, 0, 1]), 4)  # (3 / log2 3) / (3 + 1 / log2 3)
    0.5213
    """
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    gain = lambda g: (2.0 ** np.asarray(g, dtype=np.float64)[:k]) - 1.0  # noqa: E731
    ideal = float(gain(sorted(all_grades, reverse=True)) @ disc[: min(k, len(all_grades))])
    got = gain(ranked_grades)
    return float(got @ disc[: len(got)]) / ideal if ideal > 0 else 0.0


def gold_rr(ranked_grades: Sequence[int], k: int = 10) -> float:
    """Reciprocal rank of the grade-2 (gold) item within the top ``k``, else 0.

    >>> gold_rr([1, 0, 2])
    0.3333333333333333
    """
    return next((1.0 / r for r, g in enumerate(ranked_grades[:k], 1) if g == 2), 0.0)
