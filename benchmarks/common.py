"""Shared benchmark plumbing: machine facts, services, result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from codistill.app.machine import machine  # noqa: F401  (re-exported: every benchmark states it)
from codistill.app.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@contextmanager
def service(name: str, env_var: str) -> Iterator[str]:
    """Use the service the environment names, else start one with scripts/services.sh."""
    if os.environ.get(env_var):
        yield os.environ[env_var]
        return
    script = ROOT / "scripts" / "services.sh"
    subprocess.run(["bash", str(script), "start", name], check=True, cwd=ROOT)
    try:
        yield (ROOT / ".services" / f"{name}.address").read_text().strip()
    finally:
        subprocess.run(["bash", str(script), "stop", name], cwd=ROOT, check=False)


def write_result(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "finished_at": datetime.now(UTC).isoformat(),
               "load_average_1m_at_end": os.getloadavg()[0],
               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


SERVICE_PORTS = {"redis": ("CODISTILL_REDIS_PORT",),
                 "kafka": ("CODISTILL_KAFKA_PORT", "CODISTILL_KAFKA_CONTROLLER_PORT"),
                 "prometheus": ("CODISTILL_PROMETHEUS_PORT",)}


@contextmanager
def private_services(names: list[str], state: Path) -> Iterator[dict[str, str]]:
    """Start ``names`` with scripts/services.sh in ``state`` on free ports; yields their
    addresses by name and stops every one of them (also after a failed start).

    Apart from the default-port instances of ``services.sh start`` (tests, a CI clone):
    own state folder (``CODISTILL_SERVICES_STATE``, as scripts/stack.sh keeps its own),
    own ports; the services' logs stay in ``state/<name>/``.
    """
    script = ROOT / "scripts" / "services.sh"
    env = {**os.environ, "CODISTILL_SERVICES_STATE": str(state),
           **{var: str(free_port()) for n in names for var in SERVICE_PORTS[n]}}
    try:
        for name in names:
            subprocess.run(["bash", str(script), "start", name], env=env, check=True, cwd=ROOT)
        yield {n: (state / f"{n}.address").read_text().strip() for n in names}
    finally:
        subprocess.run(["bash", str(script), "stop", *names], env=env, cwd=ROOT, check=False)
