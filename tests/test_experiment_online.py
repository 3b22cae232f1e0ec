"""``codistill experiment online --quick``: the schema, and that the loop is sound.

The targets are the full run's (``benchmarks/results/online-experiment.json``); here a
tiny run on the shared small home checks what must hold at any size: every arm on the
same visits, scored before it learns, learning arms that learn, intervals that bracket
their means, and a JSON + PNG with every curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from codistill.app.cli import app
from codistill.app.experiment import report
from codistill.app.experiment.commands import QUICK, build_context
from codistill.app.experiment.run import ARMS, FROZEN, TEACHER, run_seed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(serving_env: Any, tmp_path_factory: pytest.TempPathFactory,
          ) -> tuple[dict[str, Any], Path]:
    settings, _ = serving_env
    out = tmp_path_factory.mktemp("experiment") / "quick.json"
    result = CliRunner().invoke(
        app, ["--home", str(settings.home), "experiment", "online", "--quick", "--no-prepare",
              "--no-progress", "--out", str(out)],
        env={"CODISTILL_DATA__SIZE": settings.data.size})
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), out


def test_quick_run_writes_every_arm_curve_target_and_the_figure(quick: Any) -> None:
    result, out = quick
    assert out.with_suffix(".png").stat().st_size > 10_000
    cfg = result["config"]
    assert (cfg["seeds"], cfg["impressions"], cfg["switch_after"]) == (
        QUICK["seeds"], QUICK["impressions"], QUICK["switch_after"])
    assert set(result["phases"]) == set(ARMS) == set(result["curves"]["ndcg"]["arms"])
    assert result["data"]["online_queries"] >= 50
    assert 0 < result["first_seen_share"] < 1
    n_bins = -(-cfg["impressions"] // cfg["bin"])
    for metric in ("ndcg", "rr"):
        c = result["curves"][metric]
        assert c["x"][-1] == cfg["impressions"] and len(c["x"]) == n_bins
        for series in c["arms"].values():
            assert len(series["mean"]) == n_bins and all(s == cfg["seeds"] for s in series["seeds"])
            for m, lo, hi in zip(series["mean"], series["low"], series["high"], strict=True):
                assert 0 <= m <= 1 and lo <= m <= hi
    for name, tgt in result["targets"].items():
        assert len(tgt["per_seed"]) == cfg["seeds"], name
        assert tgt["mean"] == pytest.approx(np.mean(tgt["per_seed"]))
    for seed_arms in result["arms"].values():
        for name, arm in seed_arms.items():
            assert arm["learns"] == ("/" in name)
            if arm["learns"]:
                assert arm["steps"] > 0
    # the teacher is the ceiling the frozen student is distilled towards, BM25 the floor
    ph = result["phases"]
    assert ph[TEACHER]["ndcg_all"]["mean"] > ph["bm25"]["ndcg_all"]["mean"]


def test_every_arm_is_scored_before_it_learns_and_on_the_same_visits(serving_env: Any) -> None:
    settings, _ = serving_env
    cfg = settings.experiment.model_copy(update={**QUICK, "batch_size": 8})
    ctx, _ = build_context(settings, progress=False, log=lambda *_: None, prepare=False)
    names = (TEACHER, FROZEN, "distilled/kd", "distilled/feedback")
    a = run_seed(ctx, cfg, 3, names=names, impressions=64)
    b = run_seed(ctx, cfg, 3, names=(TEACHER,), impressions=64)
    np.testing.assert_array_equal(a.ndcg[TEACHER], b.ndcg[TEACHER])  # the same users
    np.testing.assert_array_equal(a.first_seen, b.first_seen)
    first = cfg.batch_size  # no step before the first batch: the distilled start ranks alone
    for arm in ("distilled/kd", "distilled/feedback"):
        np.testing.assert_array_equal(a.ndcg[arm][:first], a.ndcg[FROZEN][:first])
    later = a.ndcg["distilled/kd"][first:] - a.ndcg[FROZEN][first:]
    assert np.abs(later).sum() > 0  # it learned, and the change shows on later visits
    assert a.arms["distilled/kd"]["steps"] == 64 // cfg.batch_size


def test_targets_and_intervals_on_known_numbers() -> None:
    ci = report.interval([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["low"] == pytest.approx(2.0 - 4.302653 / 3 ** 0.5)
    assert report.interval([0.5])["low"] is None and report.interval([])["mean"] is None
    from codistill.app.experiment.run import SeedRun

    n, switch = 2400, 1200
    ones = np.ones(n)
    run = SeedRun(0, switch, np.zeros(n, dtype=bool), ndcg={
        TEACHER: 0.5 * ones, "distilled/kd+feedback": np.r_[0.5 * ones[:switch], 0.6 * ones[switch:]],
        "scratch/kd+feedback": 0.4 * ones, "scratch/feedback": 0.1 * ones,
        "distilled/feedback": 0.4 * ones, "scratch/kd": np.r_[0.2 * ones[:200], 0.46 * ones[200:]]})
    t = report.targets([run, run])
    assert t["after_switch_kdfb_over_teacher"]["mean"] == pytest.approx(1.2)
    assert t["after_switch_kdfb_over_teacher"]["holds"] is True
    assert t["auc1000_scratch_kdfb_over_feedback"]["mean"] == pytest.approx(4.0)
    assert t["auc1000_distilled_kdfb_over_feedback"]["holds"] is None  # reported, no target
    assert t["last1000_scratch_kd_over_teacher"]["mean"] == pytest.approx(0.92)
    assert report.targets([run], first_seen=True)["last1000_scratch_kd_over_teacher"]["n"] == 0


def test_stack_agreement_verdict_on_known_curves() -> None:
    """The stack arm agrees when its phase means lie in the in-process arm's intervals,
    and not when it is off by more than the seeds' spread; trainer batches follow clicks."""
    from codistill.app.experiment.run import SeedRun
    from codistill.app.experiment.stack import REFERENCE, STACK_ARM, agreement, batch_records

    n, switch = 400, 200
    rng = np.random.default_rng(0)

    def runs(offset: float) -> list[SeedRun]:
        out = []
        for seed in range(5):
            ref = 0.5 + 0.02 * rng.standard_normal() + np.r_[np.zeros(switch), 0.1 * np.ones(n - switch)]
            scores = {REFERENCE: ref, STACK_ARM: ref + offset}
            out.append(SeedRun(seed, switch, np.zeros(n, dtype=bool), ndcg=scores, rr=scores))
        return out

    same = agreement(runs(0.0), 100)
    assert same["holds"] is True and same["bins_inside"] == same["bins"] == 4
    assert same["phases"]["after"]["difference"]["mean"] == pytest.approx(0.0)
    off = agreement(runs(-0.2), 100)
    assert off["holds"] is False and off["bins_inside"] == 0
    assert off["phases"]["all"]["difference"]["mean"] == pytest.approx(-0.2)
    run = SeedRun(0, None, np.zeros(1, dtype=bool),
                  arms={REFERENCE: {"impressions": 100, "clicks": 60}})
    assert batch_records(run, 16) == 26  # 16 impressions and their ~9.6 clicks


def test_stack_drain_waits_for_every_event_not_a_stale_zero_lag() -> None:
    """The trainer's lag gauge is set per batch, so it reads 0 while events it has not
    read yet are on the topic: draining waits for its consumed counter instead."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from codistill.app.experiment.stack import drain

    t0 = time.monotonic()

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            consumed = 10 if time.monotonic() - t0 > 0.6 else 5
            body = ('codistill_trainer_lag{partition="0"} 0.0\n'
                    f"codistill_trainer_events_consumed_total {consumed}.0\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        assert drain(url, 0.0, expected=10, timeout=5.0)
        assert time.monotonic() - t0 > 0.6  # it did not stop at the first zero lag
        assert not drain(url, 0.0, expected=11, timeout=0.5)  # never reached: False
    finally:
        server.shutdown()
        server.server_close()
