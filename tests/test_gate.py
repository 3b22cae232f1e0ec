"""The promotion gate's error rates, measured on real per-query differences.

The fixture holds the per-query valid MRR@10 of the demo's zero-shot and fine-tuned
MiniLM teachers (``scripts/make_gate_fixture.py`` wrote it from a demo home). Each
simulated candidate resamples those differences and re-centres them on a stated
effect, so the noise is the real one: ~81% ties, a few large swings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from codistill.gate import GateConfig, decide

FIXTURE = Path(__file__).parent / "fixtures" / "gate" / "minilm_zs_vs_ft_valid.json"
SEEDS = 400


@pytest.fixture(scope="module")
def real_differences() -> np.ndarray:
    data = json.loads(FIXTURE.read_text())
    return np.asarray(data["new"]) - np.asarray(data["old"])


def _candidate(real: np.ndarray, effect: float, n: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """(new, old) per-query values whose differences are real ones re-centred on ``effect``."""
    d = rng.choice(real, size=n, replace=True)
    d = d - real.mean() + effect
    return d, np.zeros(n)


def test_the_fixture_is_a_real_teacher_pair(real_differences: np.ndarray) -> None:
    assert real_differences.size == 400
    assert 0.5 < np.mean(real_differences == 0) < 0.95  # mostly ties, as MRR differences are
    assert abs(real_differences.mean() - 0.0144) < 1e-3  # valid 0.7259 -> 0.7403


@pytest.mark.slow
def test_a_zero_effect_teacher_is_promoted_at_most_8_percent_of_the_time(
    real_differences: np.ndarray,
) -> None:
    rng = np.random.default_rng(1)
    promoted = sum(
        decide({"valid": _candidate(real_differences, 0.0, 400, rng)},
               GateConfig(mode="superiority", seed=seed)).promote
        for seed in range(SEEDS))
    assert promoted <= 0.08 * SEEDS, f"{promoted} of {SEEDS} zero-effect candidates promoted"
    assert promoted > 0  # a gate that never promotes would pass this test too: it does not


@pytest.mark.slow
def test_a_three_point_guard_regression_is_rejected_at_least_95_percent_of_the_time(
    real_differences: np.ndarray,
) -> None:
    rng = np.random.default_rng(2)
    rejected = 0
    for seed in range(SEEDS):
        sets = {"valid": _candidate(real_differences, 0.03, 400, rng),  # a clear valid gain
                "guard": _candidate(real_differences, -0.03, 300, rng)}
        decision = decide(sets, GateConfig(mode="superiority", seed=seed))
        rejected += not decision.promote
        if not decision.promote:
            assert "guard" in decision.reason
    assert rejected >= 0.95 * SEEDS, f"only {rejected} of {SEEDS} regressions rejected"


def test_a_real_gain_passes_and_the_decision_is_reported(real_differences: np.ndarray) -> None:
    new, old = real_differences, np.zeros_like(real_differences)
    decision = decide({"valid": (new, old)}, GateConfig(mode="superiority", seed=0))
    assert decision.promote  # the demo's fine-tune: +0.0144 on 400 queries
    (valid,) = decision.sets
    assert valid.lower > 0 and valid.lower < valid.effect < valid.upper and valid.p_value < 0.05
    again = decide({"valid": (new, old)}, GateConfig(mode="superiority", seed=0))
    assert again.to_json() == decision.to_json()  # seeded: the same decision every time
    assert json.loads(json.dumps(decision.to_json()))["sets"][0]["name"] == "valid"


def test_non_inferiority_accepts_an_equal_model_and_rejects_a_worse_one(
    real_differences: np.ndarray,
) -> None:
    same = np.full(400, 0.5)
    assert decide({"valid": (same, same)}, GateConfig(mode="non-inferiority")).promote
    rng = np.random.default_rng(3)
    worse = _candidate(real_differences, -0.03, 400, rng)
    decision = decide({"valid": worse}, GateConfig(mode="non-inferiority"))
    assert not decision.promote and "valid" in decision.reason


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="valid"):
        decide({"guard": (np.zeros(3), np.zeros(3))})
    with pytest.raises(ValueError, match="per-query"):
        decide({"valid": (np.zeros(3), np.zeros(4))})
