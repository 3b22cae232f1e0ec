"""Stages of the closed loop as subprocesses: start, wait until ready, scrape, stop.

The closed-loop benchmark (``benchmarks/closed_loop.py``) and ``codistill experiment
online --stack`` run the stack's commands (``scripts/stack.sh commands``: the server,
the labeller, the trainer) as real processes, each in its own session with its log in
a folder, configured only by environment variables (:func:`base_env`,
:func:`backend_env`), and stop them all (SIGTERM, then SIGKILL of the process group)
whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from codistill.console import console

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = {"events", "online", "serving", "logs", "services"}  # never copied between homes
CODISTILL = ([str(Path(sys.executable).with_name("codistill"))]
             if Path(sys.executable).with_name("codistill").exists()
             else [sys.executable, "-m", "codistill.app.cli"])
SETTINGS_KEYS = {"home", "threads", "embedding_cache", "data", "teacher", "store", "stream",
                 "distill", "online", "labeller", "serving", "watcher", "traffic",
                 "experiment", "config"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StageFailed(RuntimeError):
    """A stage exited, or was not ready in time; its log tail has been printed."""


# -- processes --------------------------------------------------------------------------------
class App:
    """One stage as a subprocess in its own session; stdout and stderr in ``logs/``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.argv, self.env = name, [*CODISTILL, *args], env
        self.out, self.log = logs / f"{name}.out", logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = self.ready_s = self.exited_at = None
        self.rc: int | None = None
        self.terminated = False

    def start(self) -> App:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("ab") as out, self.log.open("ab") as err:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True)
        self.started = time.time()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            self.rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.exited_at = self.exited_at or time.time()
        return self.rc

    def terminate(self) -> None:
        """SIGTERM to the process group, once (a second one makes uvicorn skip its drain)."""
        if self.alive() and not self.terminated:
            self.terminated = True
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` s; nothing of it is left."""
        if self.proc is None:
            return
        if self.alive():
            self.terminate()
            if self.wait(grace) is None:
                console.print(f"[yellow]{self.name} ignored SIGTERM for {grace:.0f} s: KILL")
                with suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.wait(30)
        self.rc = self.proc.poll() if self.rc is None else self.rc
        self.exited_at = self.exited_at or time.time()
        with suppress(ProcessLookupError):  # anything the stage forked and left behind
            os.killpg(self.proc.pid, signal.SIGKILL)

    def left_running(self) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def tail(self, n: int = 40) -> str:
        parts = []
        for path in (self.log, self.out):
            with suppress(OSError):
                lines = path.read_text(errors="replace").splitlines()[-n:]
                if lines:
                    parts.append(f"--- {path} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts) or f"({self.name} wrote nothing)"

    def fail(self, why: str) -> StageFailed:
        console.print(f"[red]{self.name} {why}[/red] (rc {self.proc.poll() if self.proc else None})")
        console.print(self.tail(), markup=False, highlight=False, soft_wrap=True)
        return StageFailed(f"{self.name} {why}; log: {self.log}")

    def stdout_json(self) -> dict[str, Any] | None:
        """The JSON the command printed last on stdout (one line or pretty-printed)."""
        with suppress(OSError):
            text = self.out.read_text(errors="replace")
            for start in [i for i, c in enumerate(text) if c == "{" and (i == 0 or text[i - 1] == "\n")][::-1]:
                with suppress(ValueError):
                    return json.loads(text[start:])
        return None


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return 200 <= r.status < 300
    except (OSError, ValueError):
        return False


def wait_ready(apps: list[tuple[App, str]], timeout: float) -> None:
    """Until every app answers its URL; a stage that exits or stays silent fails the run."""
    deadline, todo = time.monotonic() + timeout, list(apps)
    while todo:
        for app, url in list(todo):
            if not app.alive():
                raise app.fail("exited before it was ready")
            if http_ok(url):
                app.ready_s = round(time.time() - app.started, 1)
                todo.remove((app, url))
        if todo and time.monotonic() > deadline:
            raise todo[0][0].fail(f"not ready after {timeout:.0f} s ({todo[0][1]})")
        time.sleep(0.5)


def run_cli(name: str, args: list[str], env: dict[str, str], logs: Path, timeout: float) -> float:
    """Run a one-shot command (prepare, precompute) to its end; its seconds."""
    app = App(name, args, env, logs).start()
    try:
        if app.wait(timeout) is None:
            raise app.fail(f"still running after {timeout:.0f} s")
        if app.rc != 0:
            raise app.fail("failed")
    finally:
        app.stop(5)
    return round(app.exited_at - app.started, 1)


# -- metrics ----------------------------------------------------------------------------------
Metrics = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Metrics | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            text = r.read().decode("utf-8")
    except (OSError, ValueError):
        return None
    out: Metrics = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(m: Metrics, name: str, **match: str) -> float:
    return sum(v for labels, v in m.get(name, []) if all(labels.get(k) == x for k, x in match.items()))


def until(ok: Callable[[], bool], timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return True
        time.sleep(step)
    return ok()


def copy_home(src: Path, dst: Path, skip: frozenset[str] = frozenset()) -> None:
    """``cp -a`` of a home without its runtime folders (event log, trainer, logs) and the
    top-level folders in ``skip``."""
    if dst.exists():
        shutil.rmtree(dst)
    leave = RUNTIME | skip
    shutil.copytree(src, dst, symlinks=True,
                    ignore=lambda d, names: [n for n in names if Path(d) == src and n in leave])


def base_env(home: Path, size: str) -> dict[str, str]:
    """The inherited environment without codistill settings (CODISTILL_CONFIG, CODISTILL_X__Y:
    the run is configured here only), plus the home and the data size."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("CODISTILL_")
                   and k[len("CODISTILL_"):].split("__")[0].lower() in SETTINGS_KEYS)}
    env.update({"CODISTILL_HOME": str(home), "CODISTILL_DATA__SIZE": size,
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"})
    return env


def backend_env(backend: str, services: dict[str, str], tag: str) -> dict[str, str]:
    if backend == "embedded":
        return {}
    return {"CODISTILL_STORE__BACKEND": "redis", "CODISTILL_STORE__REDIS_URL": services["redis"],
            "CODISTILL_STORE__NAMESPACE": tag,
            "CODISTILL_STREAM__BACKEND": "kafka", "CODISTILL_STREAM__BOOTSTRAP_SERVERS":
            services["kafka"], "CODISTILL_STREAM__TOPIC": f"{tag}.events",
            "CODISTILL_STREAM__DLQ_TOPIC": f"{tag}.events.dlq"}


def cleanup_shared(backend_vars: dict[str, str], tag: str) -> None:
    """Remove this run's Redis keys and Kafka topics from services it did not start."""
    with suppress(Exception):
        import redis

        client = redis.Redis.from_url(backend_vars["CODISTILL_STORE__REDIS_URL"])
        keys = list(client.scan_iter(f"{tag}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i: i + 1000])
        client.close()
    with suppress(Exception):
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=backend_vars["CODISTILL_STREAM__BOOTSTRAP_SERVERS"])
        try:
            admin.delete_topics([f"{tag}.events", f"{tag}.events.dlq"])
        finally:
            admin.close()
