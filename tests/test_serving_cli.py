"""``codistill serve`` on a home with a student and no bundle: one command, then curl."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from typer.testing import CliRunner

from tasks import dataset as ds
from tests.helpers.redis_process import free_port

ROOT = Path(__file__).resolve().parents[1]


def _get(url: str, data: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_exports_the_current_student_then_answers(serving_env, tmp_path: Path) -> None:
    from codistill.app.cli import app

    s, students = serving_env
    home = tmp_path / "home"
    home.mkdir()
    for part in ("data", "store", "students", "teachers"):  # a home right after the demo
        shutil.copytree(s.home / part, home / part)
    port = free_port()
    env = {**os.environ, "CODISTILL_DATA__SIZE": s.data.size, "CODISTILL_SERVING__PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "codistill.app.cli", "--home", str(home), "-q",
                             "serve"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                status, body = _get(f"http://127.0.0.1:{port}/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        ex = ds.read_split(s, "test")[0]
        status, body = _get(f"http://127.0.0.1:{port}/v1/rank", json.dumps({
            "query": ex.query, "candidates": [{"id": i} for i in ex.candidate_ids]}).encode())
        assert status == 200 and len(body["results"]) == len(ex.candidate_ids)
        assert body["model_version"].startswith("asym-bow-fp32-")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    assert "published bundle" in out
    result = CliRunner().invoke(app, ["--home", str(home), "bundle", "list"], env={"COLUMNS": "300"})
    assert result.exit_code == 0 and body["model_version"] in result.stdout
    result = CliRunner().invoke(app, ["--home", str(home), "bundle", "verify",
                                      body["model_version"]])
    assert result.exit_code == 0 and "match their sha256" in result.stdout
    card = json.loads((home / "bundles" / body["model_version"] / "bundle.json").read_text())
    assert card["student_version"] == students["asym-bow"]
