"""What every stage's commands share: consoles, settings loading, progress, errors.

Each stage owns its ``commands`` module (a ``typer.Typer``); the app layer
(:mod:`codistill.app.cli`) mounts them. The root callback records the global
options (``--config``, ``--home``, ``--quiet``) here, so a stage's command gets
the effective settings with one call and no import of the app.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from codistill.config import Settings, load_settings

console = Console(stderr=True)  # progress, warnings, errors
out = Console()  # results

_STATE: dict[str, Any] = {}

USAGE_ERROR = 2  # bad input, a missing prerequisite: the message says what to do
METRIC_COLUMNS = ("mrr@10", "ndcg@10", "recall@1", "recall@5", "recall@10", "n_queries")


def configure(config: Any = None, home: Any = None, progress: bool = True) -> None:
    """Record the global options of the ``codistill`` callback (once per invocation)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
    _STATE.clear()
    _STATE.update(config=config, home=home, progress=progress)


def settings(**overrides: Any) -> Settings:
    """The effective settings: defaults < file < environment < ``overrides`` (CLI flags).

    An invalid file or value is a user error: one message and exit code 2. Anything
    else is a bug and keeps its traceback.
    """
    import yaml

    if _STATE.get("home") is not None:
        overrides.setdefault("home", _STATE["home"])
    try:
        s = load_settings(_STATE.get("config"), **overrides)
    except (ValueError, OSError, yaml.YAMLError) as exc:  # validation, TOML, missing file
        console.print("[red]invalid configuration:[/red]", end=" ")
        console.print(str(exc), markup=False, soft_wrap=True)
        raise typer.Exit(USAGE_ERROR) from None
    if s.threads:  # without importing torch: the server's commands must stay torch-free
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(s.threads)
        else:
            os.environ["OMP_NUM_THREADS"] = str(s.threads)  # torch sizes its pool at import
    return s


def progress() -> bool:
    """Whether to draw progress bars: not with ``--quiet``, and only on a terminal
    unless ``CODISTILL_PROGRESS=1``."""
    return (bool(_STATE.get("progress", True)) and sys.stderr.isatty()
            or os.environ.get("CODISTILL_PROGRESS") == "1")


def fail(exc: BaseException) -> typer.Exit:
    """A user error: ``error: <exc>`` on one line (no markup: paths may hold ``[]``), exit 2.

    Only for errors the user can fix (the message names the input and the fix);
    a bug is left to raise, so it keeps its traceback.
    """
    console.print("[red]error:[/red]", end=" ")
    console.print(str(exc), markup=False, soft_wrap=True)
    return typer.Exit(USAGE_ERROR)


def metrics_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    """Ranking metrics, one row per model, as a ``rich`` table."""
    table = Table(title=title)
    table.add_column("")
    for c in METRIC_COLUMNS:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name, *(f"{m[c]:.4f}" if c != "n_queries" else str(int(m[c]))
                              for c in METRIC_COLUMNS))
    return table
