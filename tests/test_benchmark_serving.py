"""benchmarks/serving.py --quick: every system answers every request, hot swaps lose
none, and the fallback rows are the bundle's own metrics (correctness, not timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import serving as bench
from benchmarks.serving import FRACTIONS, LEVELS, SYSTEMS
from serving.bundle import BundleRegistry
from serving.runtime import OnnxRanker
from serving.vectors import VectorCache, evaluate_bundle
from stores import open_configured_store
from tasks import dataset as ds


@pytest.mark.slow
def test_quick_run_answers_every_request_and_reports_the_fallback(serving_env, tmp_path: Path
                                                                   ) -> None:
    s, _ = serving_env
    registry = BundleRegistry(s.bundles_dir)
    pointer = registry.pointer()
    out = tmp_path / "serving.json"
    threads = torch.get_num_threads()
    try:  # in process: the heavy imports (torch, sentence-transformers) are done already
        assert bench.main(["--quick", "--home", str(s.home), "--out", str(out)]) == out
    finally:
        torch.set_num_threads(threads)  # the benchmark pins torch to serving.threads
    r = json.loads(out.read_text())
    assert r["quick"] and r["machine"]["cores"] >= 1 and r["settings"]["threads"] == 1
    assert r["settings"]["events"].startswith("off")
    assert registry.pointer() == pointer, "the home's serving pointer is restored"

    bundles, student, teacher = r["bundles"], r["student_version"], r["teacher_version"]
    assert set(bundles) == {"fp32", "int8"} and bundles["fp32"] != bundles["int8"]
    answered_by = {"student-onnx": bundles["fp32"], "student-torch": student,
                   "teacher-onnx": teacher}
    n = r["settings"]["requests_per_level"]
    assert r["settings"]["concurrency"] == list(LEVELS) and n > 0 and r["queries"] > 0
    for key in SYSTEMS:
        for level in LEVELS:
            run = r["load"][key][str(level)]
            assert (run["requests"], run["ok"], run["errors"]) == (n, n, 0), (key, level, run)
            assert run["versions"] == {answered_by[key]: n}
            assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"] and run["req_per_s"] > 0
        ip = r["in_process"][key]
        assert ip["calls"] == r["settings"]["rank_calls"] and 0 < ip["p50_ms"] <= ip["p99_ms"]
    assert [f["pass"] in (True, False) for f in r["floors"]] == [True] * 4
    assert r["teacher_onnx"]["parity"]["max_one_minus_cosine"] <= 1e-4
    assert r["teacher_onnx"]["teacher_version"] == teacher

    swap = r["swap"]
    assert swap["errors"] == 0 and swap["requests"] == swap["ok"] > 0
    assert swap["swaps"] >= 2 and set(swap["versions_seen"]) == set(bundles.values())

    fb = r["fallback"]
    rows = {row["unknown_share"]: row for row in fb["rows"]}
    assert sorted(rows) == list(FRACTIONS)
    test = ds.read_split(s, "test")
    for share, row in rows.items():
        assert row["n_queries"] == len(test) > 0
        assert row["candidates"] == sum(len(ex.candidate_ids) for ex in test)
        assert row["fallbacks"] == sum(round(share * len(ex.candidate_ids)) for ex in test)
        assert 0.0 <= row["mrr@10"] <= 1.0
    store = open_configured_store(s)
    try:
        ranker = OnnxRanker.load(registry, bundles["fp32"])
        direct = evaluate_bundle(ranker, VectorCache(store, teacher), test)
    finally:
        store.close()
    assert rows[0.0]["mrr@10"] == pytest.approx(direct["mrr@10"], abs=1e-12)
    assert rows[0.0]["ndcg@10"] == pytest.approx(direct["ndcg@10"], abs=1e-12)
    assert fb["bm25"]["n_queries"] == fb["teacher"]["n_queries"] == len(test)
