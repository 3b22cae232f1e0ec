"""A private redis-server that a test can SIGKILL and restart on the same port (outage tests)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from codistill.app.processes import free_port  # noqa: F401  (the tests import it from here)


class RedisProcess:
    """``durable=True`` adds an fsync-always AOF, so a SIGKILL + restart keeps the data."""

    def __init__(self, port: int, workdir: Path, durable: bool = False) -> None:
        self.port, self.workdir, self.durable = port, workdir, durable
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server not found on PATH; run scripts/install_system.sh")
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", *aof,
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    assert self.proc.poll() is None, "redis-server exited"
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
