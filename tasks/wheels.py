"""Download pinned wheels once into a cache, verified by sha256.

One batched ``pip download`` fetches every missing wheel (pip's own client,
with ``--require-hashes`` so it picks and checks exactly the pinned file).
Cached wheels are re-hashed before use: a corrupted or swapped cache file is an
error, never a silent change of the mined data.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from codistill.fsio import sha256_file
from tasks.packages import Pin

PIP_PYTHON_VERSION = "3.11"  # the pins were chosen for this Python


class WheelError(RuntimeError):
    """A pinned wheel could not be downloaded or does not match its sha256."""


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _cached(pin: Pin, wheel_dir: Path) -> Path | None:
    """The cached wheel file of ``pin`` whose hash matches, if any."""
    prefix = f"{_normalized(pin.name)}-{pin.version}-"
    for path in sorted(wheel_dir.glob("*.whl")):
        if path.name.lower().startswith(prefix) and sha256_file(path) == pin.sha256:
            return path
    return None


def fetch_wheels(pins: Sequence[Pin], wheel_dir: Path, quiet: bool = True) -> dict[str, Path]:
    """Paths of all pinned wheels (keyed by pin name), downloading missing ones."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    found = {pin.name: _cached(pin, wheel_dir) for pin in pins}
    missing = [pin for pin in pins if found[pin.name] is None]
    if missing:
        _pip_download(missing, wheel_dir, quiet)
        for pin in missing:
            found[pin.name] = _cached(pin, wheel_dir)
    bad = [pin.requirement for pin in pins if found[pin.name] is None]
    if bad:
        raise WheelError(f"no wheel in {wheel_dir} matches the pinned sha256 of: {', '.join(bad)}")
    out = {name: path for name, path in found.items() if path is not None}
    not_pure = sorted(p.name for p in out.values() if not p.name.endswith("-none-any.whl"))
    if not_pure:
        raise WheelError(f"pinned wheels must be pure Python (*-none-any): {not_pure}")
    return out


def _pip_download(pins: Sequence[Pin], wheel_dir: Path, quiet: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text("".join(f"{p.requirement} --hash=sha256:{p.sha256}\n" for p in pins))
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--python-version", PIP_PYTHON_VERSION, "--require-hashes",
            "--disable-pip-version-check", "-d", str(wheel_dir), "-r", str(req),
        ]
        if quiet:
            cmd.append("-q")
        proc = subprocess.run(cmd, capture_output=quiet, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        raise WheelError(f"pip download of {len(pins)} pinned wheels failed:\n{tail}")
