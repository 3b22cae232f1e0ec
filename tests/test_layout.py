"""The structure the README promises: layers, module sizes, doctests, independent tests.

The import layers themselves are checked by ``lint-imports`` (``pyproject.toml``,
``[tool.importlinter]``; run by ``scripts/test.sh``); these tests guard what a
contract cannot see.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("codistill", "serving", "student", "teacher", "stores", "streaming", "tasks")
MAX_LINES = 500


def _modules() -> list[str]:
    names = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__main__.py":
                continue
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            names.append(".".join(parts))
    return names


def _contracts() -> list[dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["importlinter"]["contracts"]


def test_every_codistill_module_outside_the_app_is_a_foundation_layer() -> None:
    """A new module in ``codistill/`` must be placed in the layers contract, not slip past it."""
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    foundation = {m.strip() for m in layers[-1].replace("|", ":").split(":")}
    present = {m for m in _modules() if m.startswith("codistill.")
               and not m.startswith("codistill.app")}
    assert present == foundation, "update the last layer of [tool.importlinter] in pyproject.toml"
    assert layers[0] == "codistill.app"


@pytest.mark.parametrize("module", _modules())
def test_product_modules_stay_small(module: str) -> None:
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it"


def test_test_modules_import_no_other_test_module() -> None:
    """Shared test code lives in ``conftest.py`` or ``tests/helpers/``."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if any(part.startswith("test_") or part == "conftest" for part in name.split(".")):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders


@pytest.mark.parametrize("module", _modules())
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module),
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
