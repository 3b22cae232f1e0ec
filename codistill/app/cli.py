"""The ``codistill`` command: one entry point, one sub-command group per stage.

Each stage owns its commands (``tasks.commands``, ``teacher.commands``,
``stores.commands``, ``student.commands``); this module mounts them and adds the
commands that span stages (``config show``, ``demo``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402

from codistill import console as cli  # noqa: E402
from codistill.config import Size  # noqa: E402
from stores.commands import store_app  # noqa: E402
from streaming.commands import events_app  # noqa: E402
from student.commands import student_app  # noqa: E402
from tasks.commands import data_app  # noqa: E402
from teacher.commands import teacher_app  # noqa: E402

app = typer.Typer(help="Teacher-offline / student-online distillation for code ranking.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")
app.add_typer(store_app, name="store")
app.add_typer(events_app, name="events")
app.add_typer(student_app, name="student")


@app.callback()
def main(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML config file")] = None,
    home: Annotated[Path | None, typer.Option(help="artifact folder (default ./artifacts)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    cli.configure(config=config, home=home, progress=not quiet)


@config_app.command("show")
def config_show(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print the effective configuration (defaults < file < environment)."""
    payload = cli.settings().model_dump(mode="json")
    if as_json:
        cli.out.print_json(json.dumps(payload))
    else:
        import yaml

        cli.out.print(yaml.safe_dump(payload, sort_keys=False).rstrip())


@app.command("demo")
def demo(
    size: Annotated[Size, typer.Option(help="data size")] = "demo",
    skip_train: Annotated[bool, typer.Option(help="skip fine-tuning")] = False,
    skip_student: Annotated[bool, typer.Option(help="stop after precompute")] = False,
) -> None:
    """The main job: data -> teacher eval / fine-tune / eval -> precompute -> student."""
    from codistill.app.demo import run_demo

    s = cli.settings(data={"size": size})
    run_demo(s, progress=cli.progress(), train=not skip_train, console=cli.out,
             student=not skip_student)


if __name__ == "__main__":  # pragma: no cover
    app()
