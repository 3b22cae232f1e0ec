"""``codistill stack prepare``: the local stack's one-shot job, before anything serves.

Both stacks run it first (``docker-compose.yml``'s ``prepare`` service and
``scripts/stack.sh up``): mined data, the current teacher (zero-shot unless a better
one was promoted), its embeddings and soft labels in the configured store (Redis in
the stack), a distilled student of that teacher, a serving bundle of it, and the event
topics. Every step is skipped when its result is already there, so a second ``up``
starts in seconds and a restarted job finishes what the first began.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from codistill import console as cli
from codistill.config import Settings

stack_app = typer.Typer(help="The local stack (scripts/stack.sh, docker-compose.yml).",
                        no_args_is_help=True)


def prepare_offline(settings: Settings, progress: bool = False, log: Any = print,
                    out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Data, the current teacher's vectors and labels, and a student distilled from it.

    Each step is skipped when its result is there (the online experiment starts here too).
    """
    from student.distill import distill
    from student.registry import student_registry
    from tasks.build import build_dataset
    from teacher import workflow as wf

    out = {} if out is None else out
    out.update(home=str(settings.home), size=settings.data.size)
    manifest = build_dataset(settings.data, settings.data_dir, settings.download_dir,
                             progress=progress)
    out["data_hash"] = manifest["data_hash"]
    teacher = out["teacher_version"] = wf.ensure_current(settings)
    log(f"teacher {teacher}: precomputing into {settings.store.backend} (resumes if begun)")
    stats = wf.precompute_version(settings, teacher, wf.precompute_sets(settings), progress)
    out["precompute_s"] = round(stats.seconds, 1)

    reg = student_registry(settings.home)
    current = reg.current_version()
    if current is None or reg.load_card(current).teacher_version != teacher:
        log("distilling a student from the current teacher")
        current = distill(settings, settings.distill, progress)["student_version"]
    out["student_version"] = current
    return out


def prepare(settings: Settings, progress: bool = False, log: Any = print) -> dict[str, Any]:
    """Make sure data, teacher vectors, a student, a bundle and the topics exist."""
    from codistill.app.export import export_bundle
    from serving.bundle import BundleRegistry
    from stores import open_configured_store
    from streaming import open_stream

    t0 = time.monotonic()
    out = prepare_offline(settings, progress, log)
    current = out["student_version"]
    bundles = BundleRegistry(settings.bundles_dir)
    serving = bundles.pointer().serving
    if serving is None or bundles.load_card(serving).student_version != current:
        with open_configured_store(settings) as store:
            serving = export_bundle(settings, store, current, log=log).bundle_version
        bundles.set_serving(serving)
    out["bundle_version"] = serving

    stream = open_stream(settings.resolved_stream())
    try:
        stream.ensure_topics()
    finally:
        stream.close()
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


@stack_app.command("prepare")
def prepare_command(
    progress: Annotated[bool, typer.Option(help="progress bars")] = False,
) -> None:
    """Data, teacher vectors, student, bundle and topics for the stack (idempotent)."""
    from serving.bundle import BundleError
    from stores.base import StoreError
    from streaming.base import StreamError

    s = cli.settings()
    try:
        summary = prepare(s, progress, log=cli.console.print)
    except (BundleError, StoreError, StreamError, FileNotFoundError, ValueError) as exc:
        raise cli.fail(exc) from None
    cli.out.print_json(json.dumps(summary))
