"""``codistill serve`` and ``codistill bundle ...``: run the server, inspect bundles.

``build_server`` wires the settings to a :class:`serving.app.Server` (store, event log,
registry, the first bundle loaded, warmed and probed); ``codistill serve`` runs it
under uvicorn. Nothing here imports torch.
"""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from codistill import console as cli
from codistill.config import Settings

bundle_app = typer.Typer(help="Serving bundles: list, verify, promote.", no_args_is_help=True)


def build_server(settings: Settings, *, bundle: str | None = None):  # -> Server
    """Open the store and event log, load the first bundle; returns the ``Server``."""
    from serving.app import Server
    from serving.bundle import BundleRegistry
    from serving.events_out import EventSink
    from serving.host import ModelHost
    from serving.telemetry import ServingMetrics
    from stores import open_configured_store
    from streaming import open_stream

    cfg = settings.serving
    metrics = ServingMetrics()
    store = open_configured_store(settings)
    stream = open_stream(settings.resolved_stream()) if cfg.emit_events else None
    if stream is not None:
        stream.ensure_topics()
    registry = BundleRegistry(settings.bundles_dir)
    host = ModelHost(registry, metrics, store, threads=cfg.threads,
                     graph_level=cfg.graph_optimization, probe_budget_ms=cfg.probe_budget_ms,
                     cache_size=cfg.vector_cache,
                     audit_log=settings.home / "serving" / "audit.jsonl")
    host.promote(registry.resolve(bundle or cfg.bundle), reason="startup")
    sink = EventSink(stream, settings.stream.topic, metrics, store, cfg.event_queue)
    monitor = None
    if cfg.monitor.enabled:
        from serving.monitor import QualityMonitor

        monitor = QualityMonitor(cfg.monitor, metrics, store).start()
    return Server(cfg, host, store, sink, metrics, monitor)


def serve(settings: Settings, bundle: str | None = None) -> None:
    import uvicorn

    from serving.app import create_app

    server = build_server(settings, bundle=bundle)
    cfg = settings.serving
    cli.console.print(f"serving {server.host.serving.version} on http://{cfg.host}:{cfg.port}"
                      f" (docs: /docs, metrics: /metrics)")
    # uvicorn shuts down gracefully on SIGTERM / SIGINT, restores the handlers it found
    # and raises the signal again: with the default handlers that kills the process
    # before the event queue is drained, so the handlers it finds here do nothing
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level="warning",
                    access_log=False)
    finally:
        if server.monitor is not None:
            server.monitor.close()
        server.sink.close()  # drains the queue into the log first
        stream = server.sink.producer
        if stream is not None and hasattr(stream, "close"):
            stream.close()
        if server.store is not None:
            server.store.close()


@bundle_app.command("list")
def bundle_list() -> None:
    """Bundles in HOME/bundles, the serving one starred."""
    from rich.table import Table

    from serving.bundle import BundleRegistry

    reg = BundleRegistry(cli.settings().bundles_dir)
    ptr = reg.pointer()
    table = Table("version", "student", "teacher", "precision", "MB", "valid MRR@10", "created")
    for v in reg.versions():
        card = reg.load_card(v)
        onnx = card.metrics.get("valid (onnx)", {})
        mb = sum((reg.path(v) / f).stat().st_size for f in card.files) / 1e6
        mark = "* " if v == ptr.serving else ("- " if v == ptr.previous else "  ")
        table.add_row(mark + v, card.student_version, card.teacher_version, card.precision,
                      f"{mb:.1f}", f"{onnx.get('mrr@10', float('nan')):.4f}", card.created_at[:19])
    cli.out.print(table)


@bundle_app.command("verify")
def bundle_verify(version: Annotated[str, typer.Argument(help="bundle version")]) -> None:
    """Re-hash every file of a bundle against its card."""
    from serving.bundle import BundleError, BundleRegistry

    try:
        card = BundleRegistry(cli.settings().bundles_dir).verify(version)
    except BundleError as exc:
        raise cli.fail(exc) from None
    cli.out.print(f"{version}: {len(card.files)} files match their sha256")


@bundle_app.command("delete")
def bundle_delete(version: Annotated[str, typer.Argument(help="bundle version")]) -> None:
    """Delete a bundle that neither serves nor is the rollback target, and release its
    durable pin on its teacher version (which can then expire, see `store expire`)."""
    from serving.bundle import PIN_PREFIX, BundleError, BundleRegistry
    from stores import open_configured_store
    from stores.base import StoreError
    from stores.commands import report_expiry

    s = cli.settings()
    try:
        card = BundleRegistry(s.bundles_dir).delete(version)
        with open_configured_store(s) as store:
            store.unpin(card.teacher_version, PIN_PREFIX + version)
            cli.out.print(f"deleted bundle {version}; released its pin on {card.teacher_version}")
            report_expiry(store)
    except (BundleError, StoreError) as exc:
        raise cli.fail(exc) from None
