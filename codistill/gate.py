"""The promotion gate: is a candidate model better (or no worse) than the incumbent?

One rule for every promotion in the project: a fine-tuned teacher must be
*better* on valid (``superiority``), a new student bundle must be *no worse*
(``non-inferiority``), and in both modes no guard set (data unlike the training
data) may lose more than ``tolerance``. Differences are judged per query, on the
same lists for both models, with a seeded paired bootstrap of the mean
difference: strict ``>`` on a mean of a few hundred noisy MRR values promotes
zero-effect candidates about half the time.

Decision rule (one-sided, ``confidence`` = 0.95 by default), with ``lb`` the
``1 - confidence`` quantile of the bootstrap distribution of
``mean(new - old)``:

====================  ===========================  ===========================
set                   superiority                  non-inferiority
====================  ===========================  ===========================
valid                 ``lb > 0``                   ``lb > -tolerance``
every guard set       ``lb > -tolerance``          ``lb > -tolerance``
====================  ===========================  ===========================

References
----------
Efron, B. and Tibshirani, R. J. (1993). *An Introduction to the Bootstrap*.
Chapman & Hall. Sakai, T. (2006). Evaluating Evaluation Metrics Based on the
Bootstrap. SIGIR. Walker, E. and Nowacki, A. S. (2011). Understanding
Equivalence and Noninferiority Testing. J. Gen. Intern. Med. 26(2).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> old = rng.uniform(size=400)
>>> new = old + 0.05 + rng.normal(0, 0.1, size=400)   # a clear gain
>>> decision = decide({"valid": (new, old)}, GateConfig(mode="superiority"))
>>> decision.promote, round(decision.sets[0].effect, 3)
(True, 0.05)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["superiority", "non-inferiority"]
VALID = "valid"


class GateConfig(BaseModel):
    """How strict a promotion is; see the module docstring for the rule."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a default

    mode: Mode = "superiority"
    tolerance: float = Field(0.01, ge=0, description="largest loss allowed on a guard set "
                             "(and on valid in non-inferiority mode), in metric units")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="one-sided")
    resamples: int = Field(10_000, ge=100)
    seed: int = 0


@dataclass(frozen=True)
class SetResult:
    """The gate's view of one evaluation set."""

    name: str
    n_queries: int
    effect: float  # mean(new - old)
    lower: float  # one-sided lower confidence bound of the effect
    upper: float  # the matching upper bound (reported, not used by the rule)
    p_value: float  # share of bootstrap means at or below ``threshold`` (one-sided)
    threshold: float  # ``lower`` must exceed this
    passed: bool


@dataclass(frozen=True)
class GateDecision:
    """Promote or not, and why, per set; JSON-ready with :meth:`to_json`."""

    promote: bool
    mode: Mode
    sets: list[SetResult]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"promote": self.promote, "mode": self.mode, "reason": self.reason,
                "sets": [asdict(s) for s in self.sets]}


def bootstrap_means(differences: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` resamples (with replacement) of the per-query differences.

    >>> m = bootstrap_means(np.array([0.0, 1.0]), 1000, seed=0)
    >>> m.shape, bool(0.4 < m.mean() < 0.6)
    ((1000,), True)
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("need a non-empty 1-d array of per-query differences")
    rng = np.random.default_rng(seed)
    values, freq = np.unique(d, return_counts=True)
    if values.size <= 64:
        # Resampling n values with replacement is drawing multinomial counts over the
        # distinct values: the same distribution, far cheaper when there are few of them
        # (per-query MRR differences: a handful of values, most of them 0).
        counts = rng.multinomial(d.size, freq / d.size, size=resamples)
        return counts @ values / d.size
    out = np.empty(resamples)
    step = max(1, 2_000_000 // d.size)  # bound memory: index blocks of ~2M entries
    for start in range(0, resamples, step):
        n = min(step, resamples - start)
        out[start : start + n] = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
    return out


def judge(name: str, differences: np.ndarray, threshold: float, cfg: GateConfig,
          seed_offset: int = 0) -> SetResult:
    """One set: effect, bounds and p-value of ``mean(new - old) > threshold``."""
    means = bootstrap_means(differences, cfg.resamples, cfg.seed + seed_offset)
    alpha = 1.0 - cfg.confidence
    lower, upper = np.quantile(means, [alpha, 1.0 - alpha])
    p = float((np.count_nonzero(means <= threshold) + 1) / (means.size + 1))
    return SetResult(name, int(len(differences)), float(np.mean(differences)), float(lower),
                     float(upper), p, threshold, bool(lower > threshold))


def decide(sets: Mapping[str, tuple[np.ndarray, np.ndarray]], cfg: GateConfig | None = None
           ) -> GateDecision:
    """Judge a candidate against the incumbent on ``valid`` and every guard set.

    Parameters
    ----------
    sets
        ``name -> (new per-query metric, old per-query metric)`` on the same queries
        in the same order; must contain ``"valid"``; every other name is a guard set.
    cfg
        Mode, tolerance, confidence, resamples, seed.

    Returns
    -------
    GateDecision
        ``promote`` is True only if every set passes its threshold.
    """
    cfg = cfg or GateConfig()
    if VALID not in sets:
        raise ValueError(f"the gate needs a {VALID!r} set; got {sorted(sets)}")
    results = []
    for i, (name, (new, old)) in enumerate(sets.items()):
        new, old = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
        if new.shape != old.shape:
            raise ValueError(f"set {name!r}: {new.shape} new vs {old.shape} old per-query values")
        strict = name == VALID and cfg.mode == "superiority"
        results.append(judge(name, new - old, 0.0 if strict else -cfg.tolerance, cfg, i))
    failed = [r for r in results if not r.passed]
    valid = next(r for r in results if r.name == VALID)
    if not failed:
        reason = (f"{cfg.mode}: every set passed (valid effect {valid.effect:+.4f}, "
                  f"lower bound {valid.lower:+.4f})")
    else:
        reason = "; ".join(f"{r.name}: lower bound {r.lower:+.4f} <= {r.threshold:+.4f} "
                           f"(effect {r.effect:+.4f}, p {r.p_value:.3f})" for r in failed)
    return GateDecision(not failed, cfg.mode, results, reason)
