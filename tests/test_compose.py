"""docker-compose.yml runs the same app as its no-Docker twin, from the Dockerfile.

``bash scripts/stack.sh commands`` prints one line per app service,
``name<TAB>codistill args...``: the twin's source of truth. Compose must run
exactly those argv (the two stacks may differ only in environment variables:
host names, ports, binding 0.0.0.0), build every app service from the
Dockerfile, wire the start order with health conditions, and set only
``CODISTILL_*`` variables that ``codistill.config.Settings`` accepts.

Pure parsing, no Docker daemon: ``docker-compose config -q`` itself runs in
tests/integration/test_services.py::test_docker_compose_file_is_valid.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from codistill.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
INFRA = {"redis", "kafka", "prometheus", "grafana"}
HOME_VOLUME = "codistill-home"

HEALTHY = "service_healthy"
COMPLETED = "service_completed_successfully"
# service -> the dependencies it must wait for, and how
DEPENDS_ON = {
    "prepare": {"redis": HEALTHY, "kafka": HEALTHY},
    "server": {"prepare": COMPLETED, "redis": HEALTHY, "kafka": HEALTHY},
    "labeller": {"prepare": COMPLETED, "redis": HEALTHY, "kafka": HEALTHY},
    "trainer": {"prepare": COMPLETED, "redis": HEALTHY, "kafka": HEALTHY},
    "watcher": {"server": HEALTHY},
    "traffic": {"server": HEALTHY},
}
HEALTHCHECKED = ("server", "labeller", "trainer", "watcher")
# files scripts/setup.sh needs inside the build context
SETUP_INPUTS = ("pyproject.toml", "requirements.lock", "README.md", "scripts/setup.sh",
                "codistill/config.py", "teacher/teachers.lock.json")


@functools.cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _app() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _services().items() if name not in INFRA}


@functools.cache
def _twin() -> dict[str, tuple[str, ...]]:
    """``scripts/stack.sh commands``: app service -> argv."""
    proc = subprocess.run(["bash", "scripts/stack.sh", "commands"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands: dict[str, tuple[str, ...]] = {}
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        name, tab, args = line.partition("\t")
        assert tab, f"stack.sh commands: no TAB in {line!r}"
        argv = tuple(shlex.split(args))
        assert argv and argv[0] == "codistill", f"{name}: {argv} does not start with codistill"
        assert name not in commands, f"stack.sh commands: {name} twice"
        commands[name] = argv
    assert commands, "stack.sh commands printed nothing"
    return commands


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: str, where: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set: the default."""

    def default(m: re.Match[str]) -> str:
        assert m.group(2) is not None, f"{where}: ${{{m.group(1)}}} needs a default"
        return m.group(2)

    return _VAR.sub(default, value)


def _environment(name: str) -> dict[str, str]:
    env = _services()[name].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate(str(v), f"{name}.{k}") for k, v in env.items()}


def _settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a service's process gets from its compose environment alone."""
    for key in list(os.environ):
        if key.startswith("CODISTILL_"):
            monkeypatch.delenv(key)
    for key, value in _environment(name).items():
        monkeypatch.setenv(key, value)
    return Settings()


def _setting(settings: Settings, env_key: str) -> Any:
    """Walk ``CODISTILL_A__B`` to ``settings.a.b``, failing on a name Settings lacks
    (a top-level typo would otherwise be silently ignored by the env source)."""
    model: type[BaseModel] = Settings
    value: Any = settings
    parts = env_key.removeprefix("CODISTILL_").lower().split("__")
    for i, part in enumerate(parts):
        assert part in model.model_fields, f"{env_key}: Settings has no field {part!r}"
        value = getattr(value, part)
        annotation = model.model_fields[part].annotation
        if i < len(parts) - 1:
            assert isinstance(annotation, type) and issubclass(annotation, BaseModel), (
                f"{env_key}: {part!r} is not a section")
            model = annotation
    return value


def _healthcheck_command(name: str) -> str:
    check = _services()[name].get("healthcheck")
    assert check and check.get("test"), f"{name} has no healthcheck"
    test = check["test"]
    return test if isinstance(test, str) else " ".join(test)


# ---------------------------------------------------------------- compose = twin
def test_app_services_are_the_twins() -> None:
    assert set(_app()) == set(_twin()), (
        "app services in docker-compose.yml and `scripts/stack.sh commands` differ")


def test_commands_are_the_twins_argv() -> None:
    mismatches = {}
    for name, argv in _twin().items():
        command = _app().get(name, {}).get("command")
        assert isinstance(command, list), f"{name}: command must be a list (no shell parsing)"
        if tuple(str(a) for a in command) != argv:
            mismatches[name] = (command, list(argv))
    assert not mismatches, f"compose command != twin argv: {mismatches}"


def test_app_services_build_from_the_dockerfile() -> None:
    assert DOCKERFILE.is_file()
    images = set()
    for name, svc in _app().items():
        build = svc.get("build")
        assert build is not None, f"{name} is not built from the Dockerfile"
        if isinstance(build, str):
            build = {"context": build}
        assert (ROOT / build.get("context", ".")).resolve() == ROOT, name
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile", name
        images.add(svc.get("image"))
    assert len(images) == 1, f"app services should share one image tag: {images}"
    for name in INFRA:
        assert "build" not in _services()[name], name


# ---------------------------------------------------------------- start order, health
def test_depends_on_conditions() -> None:
    assert set(DEPENDS_ON) == set(_app())
    for name, expected in DEPENDS_ON.items():
        depends = _services()[name].get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions (long form)"
        got = {dep: (spec or {}).get("condition") for dep, spec in depends.items()}
        for dep, condition in expected.items():
            assert got.get(dep) == condition, f"{name} -> {dep}: {got.get(dep)!r}, want {condition!r}"


def test_prepare_is_a_one_shot_job() -> None:
    assert _services()["prepare"].get("restart") == "no"
    assert "healthcheck" not in _services()["prepare"]


def test_healthchecks_hit_the_configured_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    ports = {
        "server": (_settings("server", monkeypatch).serving.port, "/readyz"),
        "labeller": (_settings("labeller", monkeypatch).labeller.metrics_port, "/metrics"),
        "trainer": (_settings("trainer", monkeypatch).online.metrics_port, "/metrics"),
        "watcher": (_settings("watcher", monkeypatch).watcher.metrics_port, "/metrics"),
    }
    for name in HEALTHCHECKED:
        command = _healthcheck_command(name)
        port, path = ports[name]
        assert port, f"{name}: its port is 0 (off) in the compose environment"
        assert f"http://127.0.0.1:{port}{path}" in command, (name, command)
        # the slim image has neither
        assert "curl" not in command and "wget" not in command, (name, command)


def test_ports_bind_localhost_only() -> None:
    for name, svc in _services().items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"
    assert "127.0.0.1:8000:8000" in _services()["server"]["ports"]


# ---------------------------------------------------------------- environment
@pytest.mark.parametrize("name", sorted(DEPENDS_ON))
def test_environment_is_accepted_by_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _environment(name)
    settings = _settings(name, monkeypatch)  # raises on a nested typo (extra="forbid")
    for key, value in env.items():
        if key.startswith("CODISTILL_"):
            got = _setting(settings, key)
            shown = str(got).lower() if isinstance(got, bool) else str(got)
            assert shown == value, f"{name}: {key}={value!r} reads back as {got!r}"
    assert env.get("HF_HUB_OFFLINE") == "1", name
    assert settings.store.backend == "redis" and settings.store.redis_url.startswith("redis://redis:")
    assert settings.stream.backend == "kafka" and settings.stream.bootstrap_servers == "kafka:9092"
    assert settings.data.size == "small"
    assert settings.serving.admin_api_key, f"{name}: the watcher promotes with the admin key"


def test_home_is_the_shared_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    assert HOME_VOLUME in (_compose().get("volumes") or {})
    for name in _app():
        home = _settings(name, monkeypatch).home
        assert home.is_absolute(), f"{name}: CODISTILL_HOME must be absolute in a container"
        mounts = [str(v).split(":")[:2] for v in _services()[name].get("volumes", [])]
        assert [HOME_VOLUME, str(home)] in mounts, f"{name}: {HOME_VOLUME} not at {home}"


def test_container_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _settings("server", monkeypatch).serving
    assert server.host == "0.0.0.0"
    url = f"http://server:{server.port}"
    trainer = _settings("trainer", monkeypatch).online
    assert (trainer.metrics_host, trainer.metrics_port) == ("0.0.0.0", 9100)
    watcher = _settings("watcher", monkeypatch).watcher
    assert (watcher.metrics_host, watcher.metrics_port) == ("0.0.0.0", 9101)
    assert watcher.server_url == url
    assert _settings("traffic", monkeypatch).traffic.server_url == url
    # Prometheus scrapes what the containers expose
    scrape = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    for target in (f"server:{server.port}", "trainer:9100", "watcher:9101"):
        assert target in scrape, f"deploy/prometheus/prometheus.yml does not scrape {target}"


def test_monitoring_mounts() -> None:
    prometheus = [str(v) for v in _services()["prometheus"]["volumes"]]
    assert any(v.startswith("./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml")
               for v in prometheus)
    assert any(v.startswith("./deploy/prometheus/rules:/etc/prometheus/rules") for v in prometheus)
    grafana = [str(v) for v in _services()["grafana"]["volumes"]]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana


# ---------------------------------------------------------------- Dockerfile
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, args = pending.partition(" ")
        out.append((word.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def test_dockerfile_installs_through_setup_sh() -> None:
    steps = _instructions()
    runs = [args for word, args in steps if word == "RUN"]
    assert "bash scripts/setup.sh" in runs, "the image must install with `RUN bash scripts/setup.sh`"
    for args in runs:
        assert not re.search(r"\bpip3?\s+install\b|-m\s+pip\b|\buv\s+pip\b", args), (
            f"install only through scripts/setup.sh (requirements.lock), not: RUN {args}")
    setup = steps.index(("RUN", "bash scripts/setup.sh"))
    copies = [args.split() for word, args in steps[:setup] if word == "COPY"]
    copied = {src for args in copies for src in args[:-1] if not src.startswith("--")}
    assert copied & {".", "requirements.lock"}, "requirements.lock is not copied before setup.sh"


def test_dockerfile_runtime() -> None:
    steps = _instructions()
    base = next(args for word, args in steps if word == "FROM")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert base.startswith(f"python:{version}"), f"base {base} is not the project's Python {version}"
    envs = " ".join(args for word, args in steps if word == "ENV")
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", envs)
    assert re.search(r"\bPATH=\S*\.venv/bin", envs), ".venv/bin is not on PATH"
    users = [(i, args) for i, (word, args) in enumerate(steps) if word == "USER"]
    assert users and users[-1][1] not in ("root", "0"), "the image must run as a non-root user"
    assert users[-1][0] > steps.index(("RUN", "bash scripts/setup.sh"))
    assert ("CMD", '["codistill", "--help"]') in steps


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, closely enough: the last matching pattern wins,
    and a pattern matching a parent folder excludes what is inside."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        pats = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in pats):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_setup_inputs_and_drops_host_state() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    for path in SETUP_INPUTS:
        assert (ROOT / path).exists(), path
        assert not _ignored(path, patterns), f".dockerignore drops {path}, which setup.sh needs"
    # a host .venv would be reused by setup.sh ([ -x .venv/bin/python ]) and is not portable
    for path in (".venv/bin/python", "artifacts/data", ".services/redis.address",
                 ".stack/pids", ".git/HEAD", "codistill/__pycache__/config.cpython-311.pyc"):
        assert _ignored(path, patterns), f".dockerignore lets {path} into the image"
