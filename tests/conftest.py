"""Shared fixtures.

Integration fixtures hand out the address of a *real* service. If the
environment names one (``CODISTILL_TEST_REDIS_URL``, ``CODISTILL_TEST_KAFKA``,
``CODISTILL_TEST_PROMETHEUS``) it is used; otherwise the fixture starts the
service with the repo's own ``scripts/services.sh`` on 127.0.0.1 and stops it
when the session ends. A service that cannot be started fails the test: an
integration test never silently skips.

Every home of the session (subprocesses included) shares one teacher embedding cache
(``CODISTILL_EMBEDDING_CACHE``; keys are content-addressed), so the same texts are not
re-encoded by the same teacher in every module; a test that needs a cold cache sets
``embedding_cache`` itself. Built data sets are shared the same way
(``tests.helpers.data.build_data``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_ENV = {"redis": "CODISTILL_TEST_REDIS_URL", "kafka": "CODISTILL_TEST_KAFKA", "prometheus": "CODISTILL_TEST_PROMETHEUS"}


_SESSION_DIR: str | None = None
_SHARED = {"CODISTILL_EMBEDDING_CACHE": "embeddings", "CODISTILL_TEST_DATA_CACHE": "data"}


def pytest_configure(config: pytest.Config) -> None:
    global _SESSION_DIR
    _SESSION_DIR = tempfile.mkdtemp(prefix="codistill-session-")
    for env, sub in _SHARED.items():
        if env not in os.environ:
            os.environ[env] = os.path.join(_SESSION_DIR, sub)
            os.makedirs(os.environ[env])


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_DIR is not None:
        for env in _SHARED:
            if os.environ.get(env, "").startswith(_SESSION_DIR):
                del os.environ[env]
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


def _service(name: str, request: pytest.FixtureRequest) -> str:
    env_name = _ENV[name]
    if os.environ.get(env_name):
        return os.environ[env_name]
    script = ROOT / "scripts" / "services.sh"
    proc = subprocess.run(["bash", str(script), "start", name], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"could not start {name} with {script}:\n{proc.stdout}\n{proc.stderr}")
    address = (ROOT / ".services" / f"{name}.address").read_text().strip()
    request.addfinalizer(lambda: subprocess.run(["bash", str(script), "stop", name], cwd=ROOT, capture_output=True))
    os.environ[env_name] = address  # later fixtures in this session reuse it
    return address


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """``redis://127.0.0.1:PORT/0`` of a real redis-server."""
    return _service("redis", request)


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """``127.0.0.1:PORT`` of a real single-node KRaft Kafka broker."""
    return _service("kafka", request)


@pytest.fixture(scope="session")
def prometheus_url(request: pytest.FixtureRequest) -> str:
    """``http://127.0.0.1:PORT`` of a real Prometheus server."""
    return _service("prometheus", request)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory):
    """Settings with a fresh home per test module (defaults otherwise)."""
    from codistill.config import load_settings

    return load_settings(home=tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def teacher(settings):
    """The current (zero-shot MiniLM) teacher of that home."""
    from teacher import workflow as wf

    return wf.open_teacher(settings, wf.ensure_current(settings), progress=False)


@pytest.fixture(scope="session")
def serving_env(tmp_path_factory: pytest.TempPathFactory):
    """A small real home with an ``asym-bow`` (current) and a ``bow`` student (shared)."""
    from tests.helpers.serving import serving_home

    return serving_home(tmp_path_factory.mktemp("serving-home"))
