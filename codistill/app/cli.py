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
from codistill.app.experiment.commands import experiment_app  # noqa: E402
from codistill.app.monitor import monitor_app  # noqa: E402
from codistill.app.online import student_online  # noqa: E402
from codistill.app.simulate import simulate_command  # noqa: E402
from codistill.app.stack import stack_app  # noqa: E402
from codistill.app.traffic import traffic_command  # noqa: E402
from codistill.config import Size  # noqa: E402
from serving.commands import bundle_app  # noqa: E402
from serving.watcher import watch_command  # noqa: E402
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
app.add_typer(bundle_app, name="bundle")
app.command("serve-watch")(watch_command)
app.add_typer(monitor_app, name="monitor")
app.add_typer(stack_app, name="stack")
app.add_typer(experiment_app, name="experiment")
app.command("traffic")(traffic_command)
app.command("simulate")(simulate_command)

student_app.command("online")(student_online)  # it publishes bundles: an app command


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


@student_app.command("export")
def student_export(
    student: Annotated[str | None, typer.Argument(help="a saved student (default: current)")] = None,
    int8: Annotated[bool, typer.Option(help="quantize the graphs to int8 (same checks, "
                                       "serving.export.int8_* bounds)")] = False,
    serve: Annotated[bool, typer.Option(help="make it the serving bundle if none is")] = True,
) -> None:
    """Export a student as a torch-free ONNX bundle (HOME/bundles), after onnx.checker,
    token parity and torch-vs-ONNX score parity on the valid lists; pins its teacher."""
    from codistill.app.export import export_bundle
    from serving.bundle import BundleError, BundleRegistry
    from stores import open_configured_store
    from stores.base import StoreError

    s = cli.settings()
    store = open_configured_store(s)
    try:
        card = export_bundle(s, store, student, precision="int8" if int8 else "fp32",
                             log=cli.console.print)
    except (BundleError, FileNotFoundError, StoreError, ValueError, KeyError) as exc:
        raise cli.fail(exc) from None
    finally:
        store.close()
    registry = BundleRegistry(s.bundles_dir)
    if serve and registry.pointer().serving is None:
        registry.set_serving(card.bundle_version)
    p = card.parity
    cli.out.print(f"bundle {card.bundle_version} ({card.precision}) from {card.student_version}: "
                  f"max |torch - onnx| {p['max_score_diff']:.2e}, top-10 order agreement "
                  f"{p['top10_order_agreement']:.1%} on {p['lists']} valid lists, "
                  f"{p['token_mismatches']} token mismatches in {p['token_texts']} texts")
    sizes = registry.file_bytes(card.bundle_version)
    cli.out.print(f"{sum(sizes.values()):,} bytes: "
                  + ", ".join(f"{name} {n:,}" for name, n in sizes.items()))
    cli.out.print(str(registry.path(card.bundle_version)))


@app.command("serve")
def serve(
    bundle: Annotated[str | None, typer.Option(help="bundle version, 'serving' or 'latest' "
                                              "(default: serving.bundle, else the pointer)")] = None,
    port: Annotated[int | None, typer.Option(help="default serving.port (8000)")] = None,
    host: Annotated[str | None, typer.Option(help="default serving.host (127.0.0.1)")] = None,
    export: Annotated[bool, typer.Option(help="export the current student first when "
                                         "HOME/bundles has no bundle")] = True,
) -> None:
    """Serve a bundle over HTTP: POST /v1/rank, /v1/feedback; GET /readyz, /metrics, /docs.

    On a home with a student but no bundle yet (right after `codistill demo`) this
    exports the current student first, so one command serves the demo's student."""
    from serving.bundle import BundleError, BundleRegistry
    from serving.commands import serve as run_server
    from stores.base import StoreError
    from streaming.base import StreamError

    overrides = {k: v for k, v in (("port", port), ("host", host)) if v is not None}
    s = cli.settings(serving=overrides) if overrides else cli.settings()
    try:
        if export and bundle is None and not BundleRegistry(s.bundles_dir).versions():
            from codistill.app.export import export_bundle
            from stores import open_configured_store

            with open_configured_store(s) as store:
                card = export_bundle(s, store, log=cli.console.print)
            BundleRegistry(s.bundles_dir).set_serving(card.bundle_version)
        run_server(s, bundle)
    except (BundleError, StoreError, StreamError, FileNotFoundError, ValueError) as exc:
        raise cli.fail(exc) from None


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
