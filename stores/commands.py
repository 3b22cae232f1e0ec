"""``codistill store ...``: inspect the candidate / soft-label store and manage pins."""

from __future__ import annotations

import json
import time
from typing import Literal

import typer
from rich.table import Column, Table

from codistill import console as cli
from stores import open_configured_store
from stores.base import Store, StoreError

store_app = typer.Typer(help="Inspect and manage the candidate / soft-label store.",
                        no_args_is_help=True)


@store_app.command("info")
def store_info() -> None:
    """Versions in the store, their status, pins and the current one."""
    s = cli.settings()
    try:
        store = open_configured_store(s)
    except StoreError as exc:
        raise cli.fail(exc) from None
    try:
        current, expiring, now = store.current(), store.expiring(), time.time()
        table = Table(Column("version", overflow="fold"),  # an id cut short is useless
                      "status", "model", "scale", "dim", "counts", "pins", title=store.describe())
        for info in store.versions():
            v = info.teacher_version
            status = info.status + ("" if info.meta.get("id_scheme", "1") != "1"
                                    else " (old id scheme)")
            if v in expiring:
                status += f", expires in {_span(expiring[v] - now)}"
            table.add_row(("* " if v == current else "  ") + v, status, info.model,
                          f"{info.logit_scale:g}", str(info.dim), json.dumps(info.counts),
                          ", ".join(sorted(store.pins(v))))
        cli.out.print(table)
    finally:
        store.close()


@store_app.command("pins")
def store_pins() -> None:
    """Durable pins and leases on every version, with their age (expired leases collected)."""
    now = time.time()
    with open_configured_store(cli.settings()) as store:
        current = store.current()
        table = Table("version", "kind", "owner", "age", "expires", title=store.describe())
        for info in store.versions():
            v = info.teacher_version
            for h in store.holds(v):
                table.add_row(("* " if v == current else "  ") + v,
                              "durable pin" if h.kind == "pin" else "lease", h.owner,
                              _span(now - h.created_at) if h.created_at else "unknown",
                              "never" if h.expires_at is None
                              else f"expires in {_span(h.expires_at - now)}")
        cli.out.print(table)


def _span(seconds: float) -> str:
    """``42s``, ``7m``, ``3h``, ``2d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


@store_app.command("pin")
def store_pin(version: str, consumer: str) -> None:
    """A durable pin for a consumer: the version is never deleted or expired until unpinned."""
    _change_pin("pin", version, consumer)
    cli.out.print(f"pinned {version} for {consumer}")


@store_app.command("unpin")
def store_unpin(version: str, consumer: str) -> None:
    """Release a consumer's pin (the version may expire once no pin and not current)."""
    _change_pin("unpin", version, consumer)
    cli.out.print(f"unpinned {version} for {consumer}")
    with open_configured_store(cli.settings()) as store:
        report_expiry(store)


@store_app.command("expire")
def store_expire() -> None:
    """With store.ttl_s set: start the TTL of every complete version that is neither
    current, pinned nor leased, and delete those whose TTL has run out (run it from cron;
    `store unpin`, `student delete` and `teacher precompute` run it too)."""
    s = cli.settings()
    if not s.store.ttl_s:
        raise cli.fail(ValueError("store.ttl_s is not set, so no version expires: set it, "
                                  "e.g. CODISTILL_STORE__TTL_S=86400"))
    try:
        with open_configured_store(s) as store:
            report_expiry(store)
    except StoreError as exc:
        raise cli.fail(exc) from None


def report_expiry(store: Store) -> dict[str, list[str]]:
    """One expiry sweep (``store.expire_stale_versions``; nothing without ``ttl_s``),
    printing the versions it deleted and those that now expire."""
    before = {i.teacher_version for i in store.versions()}
    expiring = store.expire_stale_versions()
    gone = sorted(before - {i.teacher_version for i in store.versions()})
    deadlines, now = store.expiring(), time.time()
    for v in gone:
        cli.out.print(f"expired {v}")
    for v in expiring:
        left = f" in {_span(deadlines[v] - now)}" if v in deadlines else ""
        cli.out.print(f"{v} expires{left} (neither current, pinned nor leased)")
    return {"expired": gone, "expiring": expiring}


def _change_pin(action: Literal["pin", "unpin"], version: str, consumer: str) -> None:
    """``store.pin`` or ``store.unpin`` on the configured store, closed afterwards."""
    with open_configured_store(cli.settings()) as store:
        getattr(store, action)(version, consumer)
