"""``codistill events ...``: the event log's maintenance commands."""

from __future__ import annotations

from typing import Annotated

import typer

from codistill import console as cli

events_app = typer.Typer(help="Inspect and repair the event log.", no_args_is_help=True)


@events_app.command("repair")
def events_repair(
    topic: Annotated[list[str] | None, typer.Option(
        help="topic(s) to repair; default: the events topic and its dead-letter topic")] = None,
) -> None:
    """Truncate a corrupt embedded log at its first bad record so it can be served again.

    The records from the bad one on are lost: keep a copy of the folder first if a
    backup could restore them. Kafka keeps its own logs; this is for the embedded log.
    """
    from streaming.base import UnknownTopic
    from streaming.embedded import EmbeddedStream

    s = cli.settings()
    cfg = s.resolved_stream()
    if cfg.backend != "embedded":
        raise cli.fail(ValueError(f"stream.backend is {cfg.backend!r}: only the embedded log "
                                  "is repaired by codistill (Kafka recovers its own logs)"))
    assert cfg.path is not None
    with EmbeddedStream(cfg.path, cfg.topic, cfg.dlq_topic, cfg.partitions) as stream:
        for name in topic or [cfg.topic, cfg.dlq_topic]:
            try:
                reports = stream.repair(name)
            except UnknownTopic as exc:
                raise cli.fail(exc) from None
            for r in reports:
                state = (f"dropped {r.dropped} records ({r.truncated_bytes} bytes)" if
                         r.dropped or r.truncated_bytes else "intact")
                cli.out.print(f"{r.topic}[{r.partition}]: kept {r.kept}, {state}")
