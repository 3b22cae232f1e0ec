"""A private single-node KRaft Kafka broker that a test can SIGKILL and restart (outage tests).

Configured like the shared broker of ``scripts/services.sh`` (broker and controller in
one JVM, loopback only, replication factor 1), on ports of its own, with its data in
``workdir``: the storage is formatted once, so a restart comes back with every topic
and record it held. The jars are the ones ``scripts/kafka_fetch.sh`` caches (fetched
on first use). The JVM is tuned for a quick start on a small machine, not throughput.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.redis_process import free_port

ROOT = Path(__file__).resolve().parents[2]

_LOG4J = """\
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
"""
_LOG4J2 = """\
status = warn
rootLogger.level = warn
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
"""


def kafka_lib() -> Path:
    """The cached Kafka lib folder (``scripts/kafka_fetch.sh`` fetches it if missing)."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "kafka_fetch.sh")],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"scripts/kafka_fetch.sh failed:\n{proc.stderr[-2000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


class KafkaProcess:
    """``start`` / ``kill`` / ``start`` again: same ports, same data, same cluster id."""

    def __init__(self, workdir: Path, port: int | None = None,
                 controller_port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "kafka.log"
        self._lib: Path | None = None
        self._formatted = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self) -> list[str]:
        exe = shutil.which("java")
        if exe is None:
            pytest.fail("java not found on PATH; run scripts/install_system.sh kafka")
        assert self._lib is not None
        w = self.workdir
        return [exe, "-Xmx384m", "-Xms128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Djava.awt.headless=true", f"-Dlog4j.configuration=file:{w}/log4j.properties",
                f"-Dlog4j2.configurationFile={w}/log4j2.properties", f"-Dkafka.logs.dir={w}",
                "-cp", f"{self._lib}/*"]

    def _format(self) -> None:
        w = self.workdir
        (w / "data").mkdir(parents=True, exist_ok=True)
        (w / "log4j.properties").write_text(_LOG4J)
        (w / "log4j2.properties").write_text(_LOG4J2)
        (w / "server.properties").write_text(f"""\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{self.controller_port}
listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={w}/data
num.partitions=2
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
broker.session.timeout.ms=2000
broker.heartbeat.interval.ms=500
""")
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        with self.log.open("ab") as log:
            proc = subprocess.run([*self._java(), "kafka.tools.StorageTool", "format", "-t",
                                   cluster_id, "-c", str(w / "server.properties")],
                                  stdout=log, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            pytest.fail(f"kafka StorageTool format failed; see {self.log}")
        self._formatted = True

    def start(self, timeout_s: float = 90.0) -> float:
        """Start (formatting the storage the first time); seconds until clients can use it."""
        t0 = time.monotonic()
        if self._lib is None:
            self._lib = kafka_lib()
        if not self._formatted:
            self._format()
        log = self.log.open("ab")
        try:
            self.proc = subprocess.Popen(
                [*self._java(), "kafka.Kafka", str(self.workdir / "server.properties")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        finally:
            log.close()
        self._wait_ready(t0 + timeout_s)
        return time.monotonic() - t0

    def _wait_ready(self, deadline: float) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"kafka exited with {self.proc.returncode}; "
                            f"last log lines:\n{self._tail()}")
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap,
                                         request_timeout_ms=3000, bootstrap_timeout_ms=2000,
                                         client_id="kafka-process-probe")
                try:
                    if admin.describe_cluster().get("brokers"):
                        admin.list_topics()
                        return
                finally:
                    admin.close()
            except (KafkaError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"kafka not ready on {self.bootstrap}; last log lines:\n"
                            f"{self._tail()}")
            time.sleep(0.2)

    def _tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the broker (its data stays in ``workdir``) and wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(20)
