"""Where mined code comes from: the running stdlib, pinned wheels and local folders.

Each source yields :class:`SourceFile` records in a fixed order (sorted paths)
so that "keep the first duplicate" is deterministic. Wheels are read straight
out of the zip: nothing is installed, so a build never touches the environment.
Test code, vendored copies and tool-only folders are skipped here, before any
parsing, because their functions are either not documented the way library code
is or duplicates of code mined elsewhere.
"""

from __future__ import annotations

import hashlib
import sysconfig
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tasks.packages import Pin

# Folder names skipped anywhere below a source root.
SKIP_DIRS = frozenset({
    "__pycache__", "site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo",
    "ensurepip", "lib-dynload", "pydoc_data", "__phello__",
    "_vendor", "vendor", "_vendored", "vendored", "_vendored_packages", "extern", "_distutils",
    "examples", "example", "docs", "doc", "benchmarks", "migrations",
})
# Path fragments skipped in the stdlib only (`venv/scripts` holds activation templates).
_STDLIB_SKIP_PREFIXES = ("venv/scripts/", "config-", "_sysconfigdata")


@dataclass(frozen=True)
class SourceFile:
    """One Python file to mine, with the labels every pair mined from it inherits."""

    source: str  # "stdlib", "name==version" or "extra:<folder>"
    path: str  # posix path inside the source root / wheel
    module: str  # dotted module name
    group: str  # split unit: "stdlib:<top-level>", "pypi:<name>" or "extra:<name>"
    text: str


@dataclass(frozen=True)
class SourceInfo:
    """Provenance of one source, as recorded in the manifest."""

    name: str
    version: str
    sha256: str


def is_test_path(path: str) -> bool:
    """True for test files and anything inside test folders (``test*``, ``conftest.py``)."""
    parts = PurePosixPath(path).parts
    if any(p.lower().startswith("test") for p in parts):
        return True
    return parts[-1] in ("conftest.py",) or parts[-1].endswith("_test.py")


def is_skipped(path: str) -> bool:
    """True for paths that are not library code worth mining (see module docstring)."""
    parts = PurePosixPath(path).parts
    if any(p in SKIP_DIRS or p.endswith((".dist-info", ".data", ".egg-info")) for p in parts[:-1]):
        return True
    return not path.endswith(".py") or is_test_path(path)


def module_name(path: str) -> str:
    """``email/mime/text.py`` -> ``email.mime.text``; ``pkg/__init__.py`` -> ``pkg``."""
    parts = list(PurePosixPath(path).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(
    modules: Sequence[str] | None = None, root: Path | None = None
) -> Iterator[SourceFile]:
    """Files of the running interpreter's stdlib, optionally only the given top-level modules."""
    root = root or stdlib_root()
    wanted = set(modules) if modules is not None else None
    for rel in _walk(root):
        if rel.startswith(_STDLIB_SKIP_PREFIXES):
            continue
        top = PurePosixPath(rel).parts[0].removesuffix(".py")
        if wanted is not None and top not in wanted:
            continue
        text = _decode((root / rel).read_bytes())
        if text is not None:
            yield SourceFile("stdlib", rel, module_name(rel), f"stdlib:{top}", text)


def _walk(root: Path) -> list[str]:
    """Sorted posix paths below ``root`` that are not skipped."""
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file())
    return sorted(rel for rel in rels if not is_skipped(rel))


def wheel_files(wheel: Path, pin: Pin) -> Iterator[SourceFile]:
    """Files inside a wheel; the whole package is one group."""
    source, group = pin.requirement, f"pypi:{pin.name}"
    with zipfile.ZipFile(wheel) as zf:
        for rel in sorted(n for n in zf.namelist() if not n.endswith("/")):
            if is_skipped(rel):
                continue
            text = _decode(zf.read(rel))
            if text is not None:
                yield SourceFile(source, rel, module_name(rel), group, text)


def dir_files(root: Path) -> Iterator[SourceFile]:
    """Files of a user-supplied folder.

    A folder that is itself a package (has ``__init__.py``) is one group named after
    it; otherwise every top-level module or package inside is its own group.
    """
    root = Path(root)
    is_pkg = (root / "__init__.py").is_file()
    source = f"extra:{root.name}"
    for rel in _walk(root):
        text = _decode((root / rel).read_bytes())
        if text is None:
            continue
        if is_pkg:
            mod_path, group = f"{root.name}/{rel}", f"extra:{root.name}"
        else:
            mod_path, group = rel, f"extra:{PurePosixPath(rel).parts[0].removesuffix('.py')}"
        yield SourceFile(source, rel, module_name(mod_path), group, text)


def dir_info(root: Path) -> SourceInfo:
    """Provenance of a local folder: a sha256 over its mined files' paths and bytes."""
    root = Path(root)
    h = hashlib.sha256()
    for rel in _walk(root):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return SourceInfo(f"extra:{root.name}", "local", h.hexdigest())


def chain_files(*iterables: Iterable[SourceFile]) -> Iterator[SourceFile]:
    for it in iterables:
        yield from it
