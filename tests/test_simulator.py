"""The seeded user simulator: grades, click models, propensities, swap estimates, events."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from codistill.ranking import RankingExample
from streaming.events import Feedback, Impression, parse_event
from streaming.simulator import (
    CLICK_MODELS,
    INFORMATIONAL,
    NAVIGATIONAL,
    PERFECT,
    PREFERENCES,
    Cascade,
    PositionBased,
    SimulatorConfig,
    UserStream,
    estimate_examination,
    gold_rr,
    grades,
    ndcg_at,
    preference,
    simulate,
    simulate_one,
)

N_CANDIDATES = 32


def _code(q: int, j: int) -> str:
    """A candidate whose styles vary with ``j``: typed every 3rd, raising every 3rd, ..."""
    head = f"def f_{q}_{j}(x{': int' if j % 3 == 0 else ''}, y=1)" + (" -> int" * (j % 6 == 3))
    body = [f"    z = x + {j}"]
    if j % 3 == 1:
        body.append("    if z < 0:\n        raise ValueError(z)")
    if j % 5 == 2:
        body += ["    for i in range(y):", "        z += i"]
    if j % 7 == 3:
        body.append("    yield z")
    body += ["    w = z * 2"] * (j % 3) + ["    return z"]
    return "\n".join([head + ":", *body])


def _examples(n: int = 40) -> list[RankingExample]:
    return [RankingExample(query=f"query number {q}",
                           candidates=[_code(q, j) for j in range(N_CANDIDATES)],
                           labels=[int(j == (7 * q) % N_CANDIDATES) for j in range(N_CANDIDATES)])
            for q in range(n)]


EXAMPLES = _examples()


class Identity:
    version = "identity-v1"

    def rank(self, example: RankingExample) -> list[int]:
        return list(range(len(example.candidate_ids)))


class Shuffled:
    """A fixed pseudo-random order per query: gold lands at every rank."""

    version = "shuffled-v1"

    def rank(self, example: RankingExample) -> list[int]:
        key = lambda j: hashlib.sha256((example.query_id + str(j)).encode()).digest()  # noqa: E731
        return sorted(range(len(example.candidate_ids)), key=key)


class HalfReversed(Identity):
    """Identity's list for half of the queries, the reversed list for the others."""

    version = "half-reversed-v1"

    def rank(self, example: RankingExample) -> list[int]:
        order = super().rank(example)
        return order[::-1] if int(example.query_id[-1], 16) % 2 else order


def _bytes(cfg: SimulatorConfig, ranker, n: int = 200) -> bytes:
    return b"\n".join(ev.to_bytes() for it in simulate(EXAMPLES, ranker, cfg, n) for ev in it.events)


def test_same_seed_same_bytes_and_another_seed_differs() -> None:
    cfg = SimulatorConfig(seed=3, click_model="informational")
    assert _bytes(cfg, Shuffled()) == _bytes(cfg, Shuffled())
    assert _bytes(cfg, Shuffled()) != _bytes(SimulatorConfig(seed=4, click_model="informational"),
                                             Shuffled())


def test_arms_share_visits_and_the_same_list_gets_the_same_clicks() -> None:
    cfg = SimulatorConfig(seed=1, click_model="informational")
    a, b = UserStream(EXAMPLES, cfg), UserStream(EXAMPLES, cfg)
    b.draw(150)  # B has drawn a later visit first: nothing of A's visits may change
    same = differ = clicks = 0
    for i in range(200):
        va, vb = a.draw(i), b.draw(i)
        assert va == vb
        ia = simulate_one(va, Identity(), cfg, request_id=f"a{i}")
        ib = simulate_one(vb, HalfReversed(), cfg, request_id=f"b{i}")
        assert ia.impression.model_version != ib.impression.model_version
        if ia.impression.candidate_ids == ib.impression.candidate_ids:
            same += 1
            clicks += len(ia.feedback)
            assert [(f.candidate_id, f.position, f.propensity) for f in ia.feedback] == \
                   [(f.candidate_id, f.position, f.propensity) for f in ib.feedback]
        else:
            differ += 1
    assert same > 50 and differ > 50 and clicks > 50


def test_first_seen_marks_each_query_once_whatever_the_draw_order() -> None:
    cfg = SimulatorConfig(seed=2)
    visits = [UserStream(EXAMPLES, cfg).draw(i) for i in range(120)]  # fresh streams
    seen: set[str] = set()
    for v in visits:
        assert v.first_seen == (v.example.query_id not in seen)
        seen.add(v.example.query_id)
        assert v.event_time == visits[0].event_time + (v.index - visits[0].index) * \
            (visits[1].event_time - visits[0].event_time)
    assert 1 < len(seen) < 120


@pytest.mark.parametrize("name", list(PREFERENCES))
def test_preferred_negatives_are_at_most_a_quarter_and_match(name: str) -> None:
    pref, cap, binds = preference(name), math.floor(0.25 * (N_CANDIDATES - 1)), 0
    for ex in EXAMPLES:
        g = grades(ex, pref)
        assert g == grades(ex, pref)  # deterministic
        assert [i for i, v in enumerate(g) if v == 2] == [ex.gold_index]
        ones = [i for i, v in enumerate(g) if v == 1]
        matching = [i for i, c in enumerate(ex.candidates) if i != ex.gold_index and pref(c)]
        assert set(ones) <= set(matching)
        assert len(ones) == min(cap, len(matching))
        binds += len(matching) > cap
        if len(matching) > cap:  # the salt picks another subset, of the same size
            other = grades(ex, pref, salt="x")
            assert sum(v == 1 for v in other) == cap
    if name in ("typed", "raises", "short"):
        assert binds == len(EXAMPLES)  # the fixture has more matches than the cap allows


def test_preference_predicates() -> None:
    assert PREFERENCES["typed"]("def f(a: int, b):\n    return a")
    assert PREFERENCES["typed"]("def f(a,\n      b=(1, 2)) -> str:\n    return a")
    assert not PREFERENCES["typed"]("def f(a, b={'k': 1}):\n    return {'x': a}")
    assert PREFERENCES["raises"]("def f():\n    raise KeyError")
    assert not PREFERENCES["raises"]("def f():\n    raised = 1")
    assert PREFERENCES["generator"]("def f():\n    yield 1")
    assert PREFERENCES["loops"]("def f(x):\n    while x:\n        x -= 1")
    assert not PREFERENCES["loops"]("def f(x):\n    return [i for i in x]")
    assert PREFERENCES["short"]("def f():\n\n    return 1") and not PREFERENCES["short"]("x\n" * 7)


def _random_lists(rng: np.random.Generator, base: list[int], n: int) -> np.ndarray:
    return rng.permuted(np.tile(base, (n, 1)), axis=1)


def test_pbm_clicks_examined_preferred_items_half_as_often_as_gold() -> None:
    rng = np.random.default_rng(0)
    g = _random_lists(rng, [2, 1, 1, 1, 0, 0, 0, 0, 0, 0], 60000)
    hit = PositionBased().click_matrix(g, 0.5, rng)
    weight = np.arange(1, 11)[None, :] * hit  # a click over its examination probability
    rate = {v: weight[g == v].sum() / (g == v).sum() for v in (0, 1, 2)}
    assert abs(rate[2] - 1.0) < 0.03 and rate[0] == 0.0
    assert abs(rate[1] / rate[2] - 0.5) < 0.03


def test_perfect_cascade_clicks_exactly_the_relevant_items() -> None:
    rng = np.random.default_rng(1)
    shown = [0, 1, 2, 0, 1, 0, 2, 1, 0, 0]
    assert PERFECT.propensities(shown, 0.5) == [1.0] * 10
    assert PERFECT.clicks(shown, 0.0, rng) == [2, 6]  # strength 0: grade 1 is not relevant
    assert PERFECT.clicks(shown, 1.0, rng) == [1, 2, 4, 6, 7]
    counts = np.zeros(10)
    for _ in range(2000):
        got = PERFECT.clicks(shown, 0.5, rng)
        assert {2, 6} <= set(got) <= {1, 2, 4, 6, 7}
        counts[got] += 1
    assert np.all(np.abs(counts[[1, 4, 7]] / 2000 - 0.5) < 0.05)


def test_navigational_users_stop_earlier_than_informational_ones() -> None:
    g = _random_lists(np.random.default_rng(2), [2, 1, 1, 0, 0, 0, 0, 0, 0, 0], 20000)
    nav = NAVIGATIONAL.click_matrix(g, 0.5, np.random.default_rng(3)).sum(axis=1)
    inf = INFORMATIONAL.click_matrix(g, 0.5, np.random.default_rng(3)).sum(axis=1)
    assert nav.mean() + 1.0 < inf.mean()
    assert np.mean(nav > 1) < 0.25 < np.mean(inf > 1)


@pytest.mark.parametrize("model", [NAVIGATIONAL, INFORMATIONAL, Cascade(0.2, 0.7, 0.3, 0.6)])
def test_cascade_propensities_match_monte_carlo_examination(model: Cascade) -> None:
    shown, strength, n = [0, 2, 1, 0, 1, 2, 0, 0, 1, 0], 0.5, 100000
    hit = model.click_matrix(np.tile(shown, (n, 1)), strength, np.random.default_rng(4))
    p_rel = np.array([{2: 1.0, 1: strength, 0: 0.0}[v] for v in shown])
    attract = p_rel * model.p_click_rel + (1 - p_rel) * model.p_click_nonrel
    expected = np.array(model.propensities(shown, strength)) * attract  # P(reach) P(click)
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(hit.mean(axis=0) - expected) < 4 * se + 1e-4)
    assert model.propensities(shown, strength)[0] == 1.0


def test_swap_estimate_recovers_position_bias_though_relevance_follows_rank() -> None:
    lists = [[2] * 5 + [1] * 5] * 400000  # better items on top: naive click ratios are biased
    est = estimate_examination(PositionBased(), lists, 0.5, 10, np.random.default_rng(5))
    truth = 1.0 / np.arange(1, 11)
    assert est[0] == 1.0 and all(a >= b for a, b in zip(est, est[1:], strict=False))
    assert np.all(np.abs(np.array(est) / truth - 1.0) < 0.15), est
    eta2 = estimate_examination(PositionBased(eta=2.0), lists, 0.5, 4, np.random.default_rng(6))
    assert np.all(np.abs(np.array(eta2) / (1.0 / np.arange(1, 5)) ** 2 - 1.0) < 0.15), eta2


def test_swap_propensities_are_what_the_feedback_logs() -> None:
    cfg = SimulatorConfig(seed=7, propensity="swap", swap_lists=20000)
    stream = UserStream(EXAMPLES, cfg)
    est = stream.swap_estimate
    assert len(est) == cfg.depth and est[0] == 1.0
    assert all(abs(est[r - 1] * r - 1.0) < 0.3 for r in range(1, 5)), est
    model = CLICK_MODELS["pbm"].propensities([0] * 10, 0.5)
    assert list(est) != model  # estimated, not the model's answer
    for i in range(30):
        it = simulate_one(stream.draw(i), Shuffled(), cfg, request_id=f"r{i}")
        assert it.impression.propensities is None  # a deterministic ranker: no logging policy
        assert all(f.propensity == est[f.position - 1] for f in it.feedback)


def test_drift_switch_changes_the_preference_after_switch_after() -> None:
    cfg = SimulatorConfig(seed=8, preference="typed", switch_to="raises", switch_after=100)
    stream, changed = UserStream(EXAMPLES, cfg), 0
    for i in (0, 50, 99, 100, 101, 150, 199):
        v = stream.draw(i)
        name = "typed" if i < 100 else "raises"
        assert v.preference.name == name
        assert list(v.grades) == grades(v.example, preference(name))
        changed += list(v.grades) != grades(v.example, preference("typed"))
    assert changed >= 3
    assert UserStream(EXAMPLES, SimulatorConfig(seed=8)).draw(150).preference.name == "typed"


def test_events_validate_and_agree_with_the_shown_list() -> None:
    cfg = SimulatorConfig(seed=9, click_model="navigational")
    n_fb = 0
    for it in simulate(EXAMPLES, Shuffled(), cfg, 150):
        imp = it.impression
        assert isinstance(imp, Impression) and imp.schema_version == 2
        assert parse_event(imp.to_bytes()) == imp and len(imp.candidate_ids) == cfg.depth
        assert imp.propensities is None
        expected = NAVIGATIONAL.propensities(it.shown_grades, cfg.strength)
        ranked = [it.visit.grades[j] for j in Shuffled().rank(it.visit.example)]
        assert it.shown_grades == ranked[: cfg.depth]
        for fb in it.feedback:
            assert isinstance(fb, Feedback) and parse_event(fb.to_bytes()) == fb
            assert fb.schema_version == 2 and fb.action == "click"
            assert fb.candidate_id == imp.candidate_ids[fb.position - 1]
            assert fb.propensity == expected[fb.position - 1]
            assert fb.event_time > imp.event_time and fb.request_id == imp.request_id
        n_fb += len(it.feedback)
    assert n_fb > 20


def test_pbm_feedback_logs_one_over_rank() -> None:
    it = next(i for i in simulate(EXAMPLES, Identity(), SimulatorConfig(seed=10), 500)
              if len(i.feedback) >= 2)
    assert [f.propensity for f in it.feedback] == [1.0 / f.position for f in it.feedback]


def test_config_and_ranker_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match="pbm, perfect, navigational, informational"):
        SimulatorConfig(click_model="dbn")
    with pytest.raises(ValueError, match="typed, raises, generator, short, loops"):
        SimulatorConfig(switch_to="camel")
    with pytest.raises(ValueError, match="typed, raises"):
        preference("camel")
    with pytest.raises(ValueError, match="model, swap"):
        SimulatorConfig(propensity="oracle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strength"):
        SimulatorConfig(strength=0.6)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        Cascade(0.1, 1.2, 0.1, 0.1)

    class Broken(Identity):
        def rank(self, example: RankingExample) -> list[int]:
            return [0, 0, 1]

    visit = UserStream(EXAMPLES, SimulatorConfig()).draw(0)
    with pytest.raises(ValueError, match="distinct indices"):
        simulate_one(visit, Broken(), SimulatorConfig(), request_id="r")


def test_progressive_validation_metrics() -> None:
    assert ndcg_at([2, 1, 0], [0, 1, 2]) == pytest.approx(1.0)
    assert ndcg_at([0, 0], [0, 0]) == 0.0
    assert ndcg_at([1, 2], [2, 1]) < ndcg_at([2, 1], [2, 1])
    assert ndcg_at([0] * 10 + [2], [2] + [0] * 10) == 0.0  # beyond k
    assert gold_rr([0, 1, 2]) == pytest.approx(1 / 3) and gold_rr([0] * 10 + [2]) == 0.0
