"""benchmarks/teacher.py: cells, their cache, the gate's choice and the result JSON."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import teacher as bench

ROOT = Path(__file__).resolve().parents[1]


def _cell(recipe: str | None, valid: list[float], guard: list[float], accepted: bool = True) -> dict:
    return {"recipe": recipe, "accepted": accepted,
            "sets": {"valid": {"mrr@10": float(np.mean(valid))}},
            "per_query_mrr@10": {"valid": valid, "guard": guard}}


def test_choose_takes_the_best_cell_the_gate_promotes_over_the_default() -> None:
    rng = np.random.default_rng(0)
    base_valid = rng.choice([0.0, 0.2, 0.5, 1.0], size=300).tolist()
    guard = rng.choice([0.0, 0.5, 1.0], size=300).tolist()
    better = [min(1.0, v + 0.2) for v in base_valid]  # clearly better on valid
    best_but_rejected = [1.0] * 300  # a fine-tune its own gate rejected: never eligible
    hurts_guard = [min(1.0, v + 0.3) for v in base_valid]
    cells = {
        bench.DEFAULT_CELL: _cell(None, base_valid, guard),
        "minilm-256-zs": _cell(None, better, guard),
        "minilm-128-demo": _cell("demo", best_but_rejected, guard, accepted=False),
        "minilm-384-zs": _cell(None, hurts_guard, [max(0.0, g - 0.1) for g in guard]),
        "mpnet-128-zs": _cell(None, base_valid, guard),  # no better: not promoted
    }
    choice = bench.choose(cells, bench.GateConfig())
    assert choice["chosen"] == "minilm-256-zs"
    v = choice["verdicts"]
    assert not v["minilm-128-demo"]["eligible"] and not v["minilm-128-demo"]["promote"]
    assert not v["minilm-384-zs"]["promote"] and "guard" in v["minilm-384-zs"]["reason"]
    assert not v["mpnet-128-zs"]["promote"]

    del cells["minilm-256-zs"]
    assert bench.choose(cells, bench.GateConfig())["chosen"] == bench.DEFAULT_CELL


def test_cell_names_parse_and_bad_ones_fail_clearly() -> None:
    cell = bench.Cell.parse("mpnet-256-gentle")
    assert (cell.model, cell.max_len, cell.recipe, cell.name) == ("mpnet", 256, "gentle", "mpnet-256-gentle")
    for bad in ("mpnet", "minilm-x-zs", "minilm-128-nosuchrecipe"):
        with pytest.raises(SystemExit, match="cell|recipe"):
            bench.Cell.parse(bad)


@pytest.mark.slow
def test_quick_run_writes_every_cell_and_resumes_from_the_cache(tmp_path: Path) -> None:
    home, out = tmp_path / "h", tmp_path / "teacher.json"
    cmd = [sys.executable, "benchmarks/teacher.py", "--quick", "--home", str(home), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads(out.read_text())
    assert first["machine"]["cores"] >= 1 and first["data"]["data_hash"]
    assert set(first["cells"]) == set(bench.QUICK_GRID) and first["not_run"] == []
    guards = [n for n in first["cells"][bench.DEFAULT_CELL]["sets"] if n != "valid"]
    assert guards, "the small data has the prose guard set"
    for c in first["cells"].values():
        assert not c["cached"]
        for s in ("valid", *guards):
            assert 0.0 < c["sets"][s]["mrr@10"] <= 1.0 and 0.0 < c["sets"][s]["ndcg@10"] <= 1.0
        tp = c["throughput"]
        assert tp["raw_texts_per_s"] > 0 and tp["precompute_texts_per_s"] > 0
        assert tp["code_texts"] > 0 and tp["query_texts"] > 0
        assert c["cpu_seconds"] > 0 and c["precompute_projected_s"] > 0
    ft = first["cells"]["minilm-128-quick"]
    assert ft["recipe_config"]["max_steps"] == 3 and ft["train"]["steps"] == 3
    assert ft["gate_vs_zero_shot"]["mode"] == "superiority" and "promote" in ft["gate_vs_zero_shot"]
    assert ft["teacher_version"] != ft["zero_shot_version"]
    assert first["cells"]["minilm-64-zs"]["teacher_version"] != first["cells"][bench.DEFAULT_CELL]["teacher_version"]
    choice = first["choice"]
    assert choice["chosen"] in first["cells"] and choice["why"]
    assert set(choice["verdicts"]) == set(bench.QUICK_GRID) - {bench.DEFAULT_CELL}
    assert set(first["test"]) >= {bench.DEFAULT_CELL, choice["chosen"]}
    assert set(first["bm25"]) == {"valid", "test", *guards}  # the floor, on the same lists
    assert all(0.0 < m["mrr@10"] < 1.0 for m in first["bm25"].values())
    chosen_version = first["cells"][choice["chosen"]]["teacher_version"]
    assert json.loads((home / "teachers" / "current.json").read_text())["teacher_version"] == chosen_version

    # A rerun measures nothing again: every cell comes from its cache file, same numbers.
    proc = subprocess.run([*cmd, "--report"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(out.read_text())
    for name, c in again["cells"].items():
        assert c["cached"]
        assert c["sets"] == first["cells"][name]["sets"]
        assert c["throughput"] == first["cells"][name]["throughput"]
    assert again["choice"] == choice
