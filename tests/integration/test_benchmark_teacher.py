"""benchmarks/teacher.py --quick runs end to end and writes a complete JSON result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_teacher_benchmark_quick(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "teacher.json"
    env = {**os.environ, "CODISTILL_TEST_REDIS_URL": redis_url}
    proc = subprocess.run(
        [sys.executable, "benchmarks/teacher.py", "--quick", "--home", str(tmp_path / "h"), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["cores"] >= 1
    assert result["data"]["data_hash"]
    for name in ("zero_shot", "fine_tuned"):
        for split in ("valid", "test"):
            assert 0.0 < result[name][split]["mrr@10"] <= 1.0
    assert result["fine_tuned"]["budget"]["max_steps"] == 3
    assert result["encode"]["code_texts_per_s"] > 0
    for path in ("embedded_cold_cache", "embedded_warm_cache", "redis_warm_cache"):
        assert result["precompute"][path]["queries"] == sum(
            result["data"]["counts"][s]["queries"] for s in ("train", "valid", "test"))
