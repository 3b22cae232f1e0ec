"""``codistill data ...``: build code-search ranking sets from real code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from codistill import console as cli
from codistill.config import Size

data_app = typer.Typer(help="Build code-search ranking sets from real code.", no_args_is_help=True)


@data_app.command("build")
def data_build(
    size: Annotated[Size | None, typer.Option(help="small | demo | full")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="default HOME/data/SIZE")] = None,
    extra_source: Annotated[list[Path] | None, typer.Option(help="extra source folder to mine")] = None,
) -> None:
    """Mine docstring -> function pairs, split by package, add BM25 + random negatives."""
    from tasks.build import build_dataset

    s = cli.settings(**({"data": {"size": size}} if size else {}))
    target = out_dir or s.data_dir
    manifest = build_dataset(s.data, target, s.download_dir, extra_sources=extra_source or (),
                             progress=cli.progress())
    cli.out.print(f"wrote {target} (data_hash {manifest['data_hash'][:16]})")
    cli.out.print_json(json.dumps(manifest["counts"]))
