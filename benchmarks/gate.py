"""How often does each promotion rule promote the wrong teacher? (error rates, one command)

Resamples the real per-query valid MRR@10 differences of the demo's zero-shot vs
fine-tuned MiniLM (``tests/fixtures/gate/``), re-centred on a stated effect, and
counts decisions over seeded trials for the gate (:mod:`codistill.gate`,
superiority, 10,000 resamples) and for the strict ``new > old`` rule it replaced:

* type-I error: share of zero-effect candidates promoted (400 queries);
* power against a guard regression: share of candidates with a clear valid gain
  (+3 points) but a 3-point loss on a 300-query guard set that are rejected.

    .venv/bin/python benchmarks/gate.py            # 400 trials -> benchmarks/results/gate.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import machine, write_result  # noqa: E402
from codistill.gate import GateConfig, decide  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests/fixtures/gate/minilm_zs_vs_ft_valid.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=400)
    args = parser.parse_args()
    data = json.loads(FIXTURE.read_text())
    real = np.asarray(data["new"]) - np.asarray(data["old"])
    rng = np.random.default_rng(0)

    def sample(effect: float, n: int) -> np.ndarray:
        return rng.choice(real, size=n, replace=True) - real.mean() + effect

    t0 = time.perf_counter()
    counts = {"gate_zero_effect_promoted": 0, "strict_zero_effect_promoted": 0,
              "gate_guard_regression_rejected": 0, "strict_guard_regression_rejected": 0}
    for seed in range(args.trials):
        d = sample(0.0, 400)
        counts["gate_zero_effect_promoted"] += decide(
            {"valid": (d, np.zeros_like(d))}, GateConfig(seed=seed)).promote
        counts["strict_zero_effect_promoted"] += bool(d.mean() > 0)
        valid, guard = sample(0.03, 400), sample(-0.03, 300)
        counts["gate_guard_regression_rejected"] += not decide(
            {"valid": (valid, np.zeros_like(valid)), "guard": (guard, np.zeros_like(guard))},
            GateConfig(seed=seed)).promote
        counts["strict_guard_regression_rejected"] += not bool(valid.mean() > 0)  # valid only
    rates = {k: v / args.trials for k, v in counts.items()}
    result = {"trials": args.trials, "fixture": FIXTURE.name, "teachers": [data["old"], data["new"]],
              "real_mean_difference": float(real.mean()), "ties": float(np.mean(real == 0)),
              "rates": rates, "seconds": round(time.perf_counter() - t0, 1), "machine": machine()}
    path = write_result("gate", result)
    for k, v in rates.items():
        print(f"{k:36s} {v:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
